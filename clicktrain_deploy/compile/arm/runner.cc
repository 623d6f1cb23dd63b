// Runs a Relax-VM library exported for aarch64 on one float32 input; for qemu-user on x86 hosts.
//   runner MODEL.so INPUT.bin D0xD1x... OUTPUT.bin     (env REPS: calls of main, default 1)
// Input and output are raw little-endian float32; prints the output shape on stdout.
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <climits>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

namespace ffi = tvm::ffi;

struct AlignedAlloc {
  void AllocData(DLTensor* t) { t->data = aligned_alloc(64, (ffi::GetDataSize(*t) + 127) / 64 * 64); }
  void FreeData(DLTensor* t) { free(t->data); }
};

static std::vector<int64_t> ParseShape(const std::string& text) {
  std::vector<int64_t> dims;
  size_t start = 0;
  while (start < text.size()) {
    size_t end = text.find('x', start);
    if (end == std::string::npos) end = text.size();
    dims.push_back(std::stoll(text.substr(start, end - start)));
    start = end + 1;
  }
  return dims;
}

int main(int argc, char** argv) {
  if (argc != 5) {
    fprintf(stderr, "usage: %s MODEL.so INPUT.bin D0xD1x... OUTPUT.bin\n", argv[0]);
    return 1;
  }
  char path[PATH_MAX];
  if (!realpath(argv[1], path)) { perror(argv[1]); return 2; }
  std::vector<int64_t> dims = ParseShape(argv[3]);
  ffi::Tensor input = ffi::Tensor::FromNDAlloc(AlignedAlloc(), ffi::ShapeView(dims.data(), dims.size()),
                                               DLDataType{kDLFloat, 32, 1}, DLDevice{kDLCPU, 0});
  size_t bytes = ffi::GetDataSize(*input.GetDLTensorPtr());
  FILE* in = fopen(argv[2], "rb");
  if (!in || fread(input.data_ptr(), 1, bytes, in) != bytes) { fprintf(stderr, "%s: short read\n", argv[2]); return 2; }
  fclose(in);
  ffi::Module library = ffi::Module::LoadFromFile(path);
  ffi::Module vm = library->GetFunction("vm_load_executable").value()().cast<ffi::Module>();
  vm->GetFunction("vm_initialization").value()(kDLCPU, 0, 2, kDLCPU, 0, 2);  // pooled allocator
  ffi::Function main_fn = vm->GetFunction("main").value();
  int reps = getenv("REPS") ? atoi(getenv("REPS")) : 1;
  ffi::Tensor output;
  for (int r = 0; r < reps; ++r) output = main_fn(input).cast<ffi::Tensor>();
  const DLTensor* out = output.GetDLTensorPtr();
  FILE* f = fopen(argv[4], "wb");
  fwrite(out->data, 1, ffi::GetDataSize(*out), f);
  fclose(f);
  for (int i = 0; i < out->ndim; ++i) printf(i ? "x%lld" : "%lld", (long long)out->shape[i]);
  printf("\n");
  return 0;
}
