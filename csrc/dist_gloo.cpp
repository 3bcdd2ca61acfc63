// A c10d process group over gloo (libtorch's own distributed engine, in libtorch_cpu) for
// src/dist/: a rendezvous store (TCP or file), ProcessGroupGloo on it, and the collectives the
// Rust side uses, each waited on with the group's timeout. Compiled with the gloo stand-in
// headers of csrc/gloo_stub/ (the wheel lacks gloo's own): this file must not construct a
// GlooStore nor call ProcessGroupGloo::setTimeout (../shared/reference/DISTRIBUTED.md).

#include <torch/csrc/distributed/c10d/FileStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include "dist.h"
#include "tch_peft.h"

#include <chrono>
#include <memory>
#include <string>
#include <vector>

namespace {

using tch_peft::wait_work;

// Whether the collective can run on the tensor itself: one dense, contiguous tensor.
bool in_place(const std::vector<at::Tensor>& ts) {
  return ts.size() == 1 && ts[0].is_contiguous() && !ts[0].is_sparse();
}

// The tensors as one flat buffer (one collective for all of them), dense and contiguous: the
// tensor itself where it can be reduced in place, else a new buffer (one copy).
at::Tensor flatten(const std::vector<at::Tensor>& ts) {
  if (in_place(ts)) return ts[0].view({-1});
  if (ts.size() == 1) {
    at::Tensor flat = ts[0].reshape({-1});
    return flat.is_alias_of(ts[0]) ? flat.clone() : flat;
  }
  std::vector<at::Tensor> flat;
  flat.reserve(ts.size());
  for (const auto& t : ts) flat.push_back(t.reshape({-1}));
  return at::cat(flat);
}

// Writes the buffer back into the tensors (nothing to do where it was reduced in place).
void unflatten(const at::Tensor& buf, const std::vector<at::Tensor>& ts) {
  if (in_place(ts)) return;
  int64_t off = 0;
  for (const auto& t : ts) {
    const int64_t n = t.numel();
    at::Tensor dst = t;
    dst.copy_(buf.narrow(0, off, n).view(t.sizes()));
    off += n;
  }
}

// `run` (a collective, waited on) on the `n` tensors as one flat buffer, which is then written
// back into them.
template <typename Run>
void on_flat_buffer(const at::Tensor* const* ts, size_t n, Run run) {
  if (n == 0) return;
  std::vector<at::Tensor> list = tch_peft::tensor_list(ts, n);
  std::vector<at::Tensor> buf{flatten(list)};
  run(buf);
  unflatten(buf[0], list);
}

}  // namespace

extern "C" {

int tch_peft_group_new(const char* host, int port, const char* file, int rank, int size,
                       int64_t timeout_ms, int is_server, const char* device_host,
                       tch_peft_group** out, char** error) {
  return tch_peft::guarded<int>("tch_peft_group_new", error, 1, [&] {
    const std::chrono::milliseconds timeout(timeout_ms);
    c10::intrusive_ptr<c10d::Store> store;
    if (file != nullptr) {
      store = c10::make_intrusive<c10d::FileStore>(std::string(file), size);
    } else {
      c10d::TCPStoreOptions opts;
      opts.port = static_cast<std::uint16_t>(port);
      opts.isServer = is_server != 0;
      opts.numWorkers = static_cast<std::size_t>(size);
      opts.waitWorkers = false;
      opts.timeout = timeout;
      store = c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
    }
    store->setTimeout(timeout);
    auto options = c10d::ProcessGroupGloo::Options::create(timeout);
    // "if:a,b": one device per network interface (GLOO_SOCKET_IFNAME); "": the default device
    // (the address of this machine's hostname); else the device of that host's address
    const std::string dev(device_host);
    if (dev.rfind("if:", 0) == 0) {
      std::string names = dev.substr(3);
      size_t start = 0;
      while (start <= names.size()) {
        size_t end = names.find(',', start);
        if (end == std::string::npos) end = names.size();
        if (end > start) {
          options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(
              names.substr(start, end - start)));
        }
        start = end + 1;
      }
      if (options->devices.empty()) throw std::runtime_error("no interface named");
    } else if (dev.empty()) {
      options->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    } else {
      options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(dev));
    }
    auto gloo = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, size, options);
    auto pg = c10::make_intrusive<c10d::ProcessGroup>(store, rank, size);
    pg->setBackend(c10::DeviceType::CPU, c10d::ProcessGroup::BackendType::GLOO, gloo);
    pg->setDefaultBackend(c10d::ProcessGroup::BackendType::GLOO);
    pg->setGroupName("tch_peft");
    *out = new tch_peft_group{store, pg, gloo, {}, timeout};
    return 0;
  });
}

// Shuts the backends down first (NCCL warns at exit otherwise); errors there are dropped.
void tch_peft_group_free(tch_peft_group* g) {
  try {
    g->pg->shutdown();
  } catch (...) {
  }
  delete g;
}

// op: 0 sum, 1 average. The tensors are reduced as one flat buffer and written back in place.
int tch_peft_group_all_reduce(tch_peft_group* g, const at::Tensor* const* ts, size_t n, int op,
                              char** error) {
  return tch_peft::guarded<int>("tch_peft_group_all_reduce", error, 1, [&] {
    on_flat_buffer(ts, n, [&](std::vector<at::Tensor>& buf) {
      c10d::AllreduceOptions opts;
      opts.reduceOp = c10d::ReduceOp::SUM;
      opts.timeout = g->timeout;
      wait_work(g->pg->allreduce(buf, opts), buf[0].device(), g->timeout);
      if (op == 1) buf[0].div_(g->pg->getSize());
    });
    return 0;
  });
}

int tch_peft_group_broadcast(tch_peft_group* g, const at::Tensor* const* ts, size_t n, int root,
                             char** error) {
  return tch_peft::guarded<int>("tch_peft_group_broadcast", error, 1, [&] {
    on_flat_buffer(ts, n, [&](std::vector<at::Tensor>& buf) {
      c10d::BroadcastOptions opts;
      opts.rootRank = root;
      opts.timeout = g->timeout;
      wait_work(g->pg->broadcast(buf, opts), buf[0].device(), g->timeout);
    });
    return 0;
  });
}

int tch_peft_group_barrier(tch_peft_group* g, char** error) {
  return tch_peft::guarded<int>("tch_peft_group_barrier", error, 1, [&] {
    c10d::BarrierOptions opts;
    opts.timeout = g->timeout;
    wait_work(g->gloo->barrier(opts), at::Device(at::kCPU), g->timeout);
    return 0;
  });
}

}  // extern "C"
