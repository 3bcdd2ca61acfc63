// Keeps libtorch_cuda on every final binary's link line. libtorch_cuda registers CUDA with
// libtorch from static initialisers only; nothing calls into it, so a linker run with
// --as-needed (rustc's default on Linux) drops it and CUDA silently reports unavailable.
// `cargo:rustc-link-arg=-Wl,--no-as-needed` would keep it but does not reach dependent crates;
// build.rs instead links this object with `static:+whole-archive,-bundle`, which does, and its
// static initialiser takes the address of a libtorch_cuda function: an undefined reference that
// libtorch_cuda alone satisfies, so the linker keeps it as needed. The function is never called.
// Compiled only where libtorch has CUDA (Linux).

struct cudaDeviceProp;

namespace at::cuda {
// exported by libtorch_cuda (ATen/cuda/CUDAContextLight.h)
cudaDeviceProp* getCurrentDeviceProperties();
}  // namespace at::cuda

namespace {

struct TorchCudaAnchor {
  TorchCudaAnchor() {
    volatile const void* f = reinterpret_cast<const void*>(&at::cuda::getCurrentDeviceProperties);
    (void)f;
  }
};

const TorchCudaAnchor anchor;

}  // namespace
