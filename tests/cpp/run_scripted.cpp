// What a C++ user of a scripted MattingRefine does, without Python: load
// pymatting_ext's op library (its kernels register themselves), load the
// scripted model with torch::jit::load, run it.
//
//   run_scripted <pymatting_ext/_C*.so> <model.pt> <case.pt>
//
// case.pt is a scripted module whose buffers hold the inputs (src, bgr) and
// the outputs Python computed (out0..out5); prints the largest difference of
// each output and exits 0 if all are equal.
#include <dlfcn.h>
#include <torch/script.h>

#include <iostream>
#include <string>

int main(int argc, char** argv) {
  if (argc != 4) {
    std::cerr << "usage: run_scripted <pymatting_ext _C library> <model.pt> <case.pt>\n";
    return 2;
  }
  // NB: RTLD_LAZY: the library's Python module entry point is never called,
  // so its one Python symbol need not resolve.
  if (dlopen(argv[1], RTLD_LAZY | RTLD_GLOBAL) == nullptr) {
    std::cerr << "dlopen failed: " << dlerror() << "\n";
    return 2;
  }
  torch::jit::Module model = torch::jit::load(argv[2]);
  torch::jit::Module data = torch::jit::load(argv[3]);
  model.eval();
  torch::NoGradGuard no_grad;
  auto outputs = model.forward({data.attr("src").toTensor(), data.attr("bgr").toTensor()}).toTuple();
  bool same = true;
  for (size_t i = 0; i < outputs->elements().size(); ++i) {
    const at::Tensor got = outputs->elements()[i].toTensor();
    const at::Tensor want = data.attr("out" + std::to_string(i)).toTensor();
    const bool equal = got.sizes() == want.sizes() && got.dtype() == want.dtype() && torch::equal(got, want);
    const double diff = got.sizes() == want.sizes()
                            ? (got.to(torch::kDouble) - want.to(torch::kDouble)).abs().max().item<double>()
                            : -1.0;
    std::cout << "output " << i << ": max |diff| " << diff << (equal ? " equal" : " DIFFERENT") << "\n";
    same = same && equal;
  }
  return same ? 0 : 1;
}
