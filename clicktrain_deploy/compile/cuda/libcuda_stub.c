/* Stand-in for the NVIDIA driver's libcuda.so.1 on machines without one (CI, build hosts).
 *
 * TVM's CUDA backend (libtvm_runtime_cuda.so: CUDA codegen hand-off to nvcc, CUDA module
 * serialisation) links against libcuda.so.1 and is skipped when it cannot be loaded, leaving only
 * a source-only module that no runtime can load. With this stub loaded first, the backend loads,
 * device code is built with nvcc, and every driver call reports CUDA_ERROR_STUB_LIBRARY (34), so
 * nothing can run by mistake. These are the driver symbols libtvm_runtime_cuda.so imports. */
#define CUDA_ERROR_STUB_LIBRARY 34

int cuDeviceGetName(void) { return CUDA_ERROR_STUB_LIBRARY; }
int cuFuncSetAttribute(void) { return CUDA_ERROR_STUB_LIBRARY; }
int cuLaunchKernelEx(void) { return CUDA_ERROR_STUB_LIBRARY; }
int cuModuleGetFunction(void) { return CUDA_ERROR_STUB_LIBRARY; }
int cuModuleLoadData(void) { return CUDA_ERROR_STUB_LIBRARY; }
int cuModuleUnload(void) { return CUDA_ERROR_STUB_LIBRARY; }
int cuTensorMapEncodeTiled(void) { return CUDA_ERROR_STUB_LIBRARY; }

int cuGetErrorName(int error, const char **name) {
    *name = error == CUDA_ERROR_STUB_LIBRARY ? "CUDA_ERROR_STUB_LIBRARY" : "CUDA_ERROR_UNKNOWN";
    return 0;
}

int cuGetErrorString(int error, const char **text) {
    *text = "no NVIDIA driver on this machine (clicktrain-deploy's libcuda stub)";
    return 0;
}
