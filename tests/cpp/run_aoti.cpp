// What a C++ user of an AOTInductor package of MattingRefine does, without
// Python: load pymatting_ext's op library (its kernels register themselves
// with the dispatcher, where the package's calls to the custom ops find
// them), load the package with AOTIModelPackageLoader, run it.
//
//   run_aoti <pymatting_ext/_C*.so> <model.pt2> <case.pt> [<case.pt> ...]
//
// Each case.pt is a dict saved with torch.save: the inputs (src, bgr) and
// the outputs Python computed (out0..out5); cases of several sizes run one
// package exported with dynamic sizes. Prints the largest difference of
// each output and exits 0 if every output of every case is within 1e-5 of
// Python's (the package's own kernels fuse and reorder the backbone's
// arithmetic).
#include <dlfcn.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/script.h>
#include <torch/serialize.h>

#include <fstream>
#include <iostream>
#include <iterator>
#include <string>
#include <vector>

int main(int argc, char** argv) {
  if (argc < 4) {
    std::cerr << "usage: run_aoti <pymatting_ext _C library> <model.pt2> <case.pt> [<case.pt> ...]\n";
    return 2;
  }
  // NB: RTLD_LAZY: the library's Python module entry point is never called,
  // so its one Python symbol need not resolve.
  if (dlopen(argv[1], RTLD_LAZY | RTLD_GLOBAL) == nullptr) {
    std::cerr << "dlopen failed: " << dlerror() << "\n";
    return 2;
  }
  torch::inductor::AOTIModelPackageLoader loader(argv[2]);
  torch::NoGradGuard no_grad;
  bool same = true;
  for (int c = 3; c < argc; ++c) {
    std::ifstream file(argv[c], std::ios::binary);
    const std::vector<char> bytes((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
    const c10::Dict<c10::IValue, c10::IValue> data = torch::pickle_load(bytes).toGenericDict();
    const at::Tensor src = data.at("src").toTensor();
    std::cout << argv[c] << ": src " << src.sizes() << "\n";
    const std::vector<at::Tensor> outputs = loader.run({src, data.at("bgr").toTensor()});
    for (size_t i = 0; i < outputs.size(); ++i) {
      const at::Tensor& got = outputs[i];
      const at::Tensor want = data.at("out" + std::to_string(i)).toTensor();
      const bool shaped = got.sizes() == want.sizes() && got.dtype() == want.dtype();
      const double diff =
          shaped ? (got.to(torch::kDouble) - want.to(torch::kDouble)).abs().max().item<double>() : -1.0;
      const bool close = shaped && diff <= 1e-5;
      std::cout << "output " << i << ": max |diff| " << diff << (close ? " close" : " DIFFERENT") << "\n";
      same = same && close;
    }
  }
  return same ? 0 : 1;
}
