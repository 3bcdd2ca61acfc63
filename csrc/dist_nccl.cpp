// The NCCL backend of a tch_peft_group (c10d's ProcessGroupNCCL, in libtorch_cuda), for CUDA
// tensors: compiled only where NCCL's, CUDA's and CCCL's headers are found (build.rs).

#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>

#include "dist.h"
#include "tch_peft.h"

extern "C" {

// Adds NCCL on CUDA device `device` to the group (every rank calls it, each with its own
// device): its communicator is made now, on the group's store under the prefix "nccl", and its
// waits bounded by the group's timeout.
int tch_peft_group_add_nccl(tch_peft_group* g, int device, char** error) {
  return tch_peft::guarded<int>("tch_peft_group_add_nccl", error, 1, [&] {
    if (g->nccl) throw std::runtime_error("the group has an NCCL backend already");
    const at::Device dev(at::kCUDA, static_cast<c10::DeviceIndex>(device));
    c10::cuda::set_device(dev.index());
    auto opts = c10d::ProcessGroupNCCL::Options::create();
    opts->timeout = g->timeout;
    auto store = c10::make_intrusive<c10d::PrefixStore>("nccl", g->store);
    auto nccl = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, g->pg->getRank(),
                                                            g->pg->getSize(), opts);
    nccl->setBoundDeviceId(dev);
    g->pg->setBackend(c10::DeviceType::CUDA, c10d::ProcessGroup::BackendType::NCCL, nccl);
    g->pg->setGroupName("tch_peft");
    nccl->eagerConnectSingleDevice(dev);
    g->nccl = nccl;
    return 0;
  });
}

}  // extern "C"
