"""What was compiled: the compiled variants of every launched kernel (the
warm-up that compiles them ahead of the first frame is
pymatting_ext.warmup, above the Refiner it runs)."""
import sys


def _kernels():
    """Every launched @triton.jit kernel (named *_kernel) of the package's
    loaded modules, by name."""
    import triton

    found = {}
    prefix = f"{__package__}."
    for module_name, module in list(sys.modules.items()):
        if not module_name.startswith(prefix) or module is None:
            continue
        name = module_name[len(prefix):]
        for attr, value in vars(module).items():
            if attr.endswith("_kernel") and isinstance(value, triton.runtime.jit.JITFunction):
                found[f"{name}.{attr}"] = value
    return found


def compiled_variants() -> dict:
    """{kernel name: number of compiled variants (all devices)}; empty under
    the interpreter, which compiles nothing."""
    counts = {}
    for name, kernel in _kernels().items():
        caches = getattr(kernel, "device_caches", None)
        if caches is not None:  # Triton >= 3.0: device -> (kernel cache, ...)
            counts[name] = sum(len(entry[0]) for entry in caches.values())
        else:  # pragma: no cover - older Triton
            counts[name] = sum(len(c) for c in getattr(kernel, "cache", {}).values())
    return counts
