// DDP's Reducer (libtorch_cpu) over a tch_peft_group, for src/dist/ddp.rs: buckets of gradients
// all-reduced while the backward still runs (autograd hooks on the parameters' gradient
// accumulators), rebuilt in the order gradients became ready after the first iteration, and
// what nn.parallel.DistributedDataParallel does around each forward (2.11's _pre_forward and
// _post_forward), with a bf16 compression hook like PyTorch's bf16_compress_hook.

#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/engine.h>
#include <torch/csrc/distributed/c10d/comm.hpp>
#include <torch/csrc/distributed/c10d/reducer.hpp>

#include "dist.h"
#include "tch_peft.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

struct tch_peft_reducer {
  std::shared_ptr<c10d::Reducer> reducer;
  bool find_unused;
  bool static_graph;
  // static graph: the first backward's delayed all-reduce has been queued (by a hook on the
  // first synchronised forward's outputs, from autograd's thread; DDP's
  // _static_graph_delay_allreduce_enqueued)
  std::shared_ptr<std::atomic<bool>> delay_queued;
};

namespace {

// bf16_compress_hook: each bucket cast to bf16 and divided by the world size, all-reduced, and
// written back into the (f32) bucket; the Reducer then copies it into the gradients.
class Bf16CompressHook
    : public c10d::CppCommHookInterface<c10::intrusive_ptr<c10d::ProcessGroup>> {
 public:
  explicit Bf16CompressHook(const c10::intrusive_ptr<c10d::ProcessGroup>& pg)
      : c10d::CppCommHookInterface<c10::intrusive_ptr<c10d::ProcessGroup>>(pg) {}

  c10::intrusive_ptr<c10::ivalue::Future> runHook(c10d::GradBucket& bucket) override {
    at::Tensor buffer = bucket.getBufferRef();
    std::vector<at::Tensor> compressed{buffer.to(at::kBFloat16).div_(state_->getSize())};
    auto fut = state_->allreduce(compressed)->getFuture();
    return fut->then(
        [buffer](c10::ivalue::Future& done) {
          buffer.copy_(done.value().toTensorVector().at(0));
          return c10::IValue(buffer);
        },
        c10::TensorType::get());
  }
};

}  // namespace

extern "C" {

int tch_peft_reducer_new(tch_peft_group* g, const at::Tensor* const* params, size_t n,
                         const char* const* names, int64_t bucket_cap_bytes,
                         int64_t first_bucket_cap_bytes, int find_unused, int grad_as_bucket_view,
                         int static_graph, int bf16_compress, tch_peft_reducer** out,
                         char** error) {
  return tch_peft::guarded<int>("tch_peft_reducer_new", error, 1, [&] {
    std::vector<at::Tensor> ps = tch_peft::tensor_list(params, n);
    std::unordered_map<size_t, std::string> param_names;
    for (size_t i = 0; i < n; ++i) param_names.emplace(i, names[i]);
    std::vector<bool> sparse(n, false);
    // DDP: one bucket for the first iteration unless unused parameters are searched for (the
    // declaration order need not be the backward's); rebuilt in ready order after it
    std::vector<size_t> limits;
    if (static_graph != 0 || find_unused == 0) {
      limits = {SIZE_MAX};
    } else {
      limits = {static_cast<size_t>(first_bucket_cap_bytes),
                static_cast<size_t>(bucket_cap_bytes)};
    }
    auto assignment = c10d::compute_bucket_assignment_by_size(ps, limits, sparse);
    std::vector<std::vector<size_t>> buckets = std::get<0>(assignment);
    // DDP reverses them: gradients come in roughly the reverse of the declaration order
    std::reverse(buckets.begin(), buckets.end());
    auto reducer = std::make_shared<c10d::Reducer>(
        ps, buckets, g->pg, sparse, bucket_cap_bytes, find_unused != 0,
        grad_as_bucket_view != 0, param_names, first_bucket_cap_bytes,
        /*skip_all_reduce_unused_params=*/false, /*use_python_reducer=*/false,
        std::vector<int64_t>{});
    if (static_graph != 0) reducer->set_static_graph();
    if (bf16_compress != 0) reducer->register_comm_hook(std::make_unique<Bf16CompressHook>(g->pg));
    *out = new tch_peft_reducer{reducer, find_unused != 0, static_graph != 0,
                                std::make_shared<std::atomic<bool>>(false)};
    return 0;
  });
}

void tch_peft_reducer_free(tch_peft_reducer* r) {
  try {
    r->reducer.reset();
  } catch (...) {
  }
  delete r;
}

// Before a forward: with grad mode on and `sync`, the Reducer's prepare_for_forward; with grad
// mode on, rebuild_buckets (acts once, after the first iteration). *rebuilt: it did now.
int tch_peft_reducer_pre_forward(tch_peft_reducer* r, int sync, int* rebuilt, char** error) {
  return tch_peft::guarded<int>("tch_peft_reducer_pre_forward", error, 1, [&] {
    *rebuilt = 0;
    if (!at::GradMode::is_enabled()) return 0;
    if (sync != 0) r->reducer->prepare_for_forward();
    *rebuilt = r->reducer->rebuild_buckets() ? 1 : 0;
    return 0;
  });
}

// After a forward, on its outputs: with grad mode on and `sync`, prepare_for_backward (the
// outputs are searched for unused parameters with find_unused, as DDP does without a static
// graph); with a static graph, the first backward through an output queues the delayed
// all-reduce of every bucket at the end of that backward (DDP's _DDPSink does the same).
int tch_peft_reducer_post_forward(tch_peft_reducer* r, const at::Tensor* const* outs, size_t n,
                                  int sync, char** error) {
  return tch_peft::guarded<int>("tch_peft_reducer_post_forward", error, 1, [&] {
    if (!at::GradMode::is_enabled() || sync == 0) return 0;
    std::vector<at::Tensor> os = tch_peft::tensor_list(outs, n);
    const bool hook_delay = r->static_graph && !r->delay_queued->load();
    if (hook_delay) {
      const bool any = std::any_of(os.begin(), os.end(),
                                   [](const at::Tensor& o) { return o.requires_grad(); });
      if (!any) {
        throw std::runtime_error(
            "with a static graph, the first synchronised forward needs an output that requires "
            "grad: its backward queues the delayed all-reduce of every bucket");
      }
    }
    if (r->find_unused && !r->static_graph) {
      r->reducer->prepare_for_backward(os);
    } else {
      r->reducer->prepare_for_backward({});
    }
    if (hook_delay) {
      std::weak_ptr<c10d::Reducer> weak = r->reducer;
      std::shared_ptr<std::atomic<bool>> queued = r->delay_queued;
      for (auto& o : os) {
        if (!o.requires_grad()) continue;
        o.register_hook([weak, queued](const at::Tensor&) {
          if (queued->exchange(true)) return;
          torch::autograd::Engine::get_default_engine().queue_callback([weak] {
            if (auto reducer = weak.lock()) reducer->delay_all_reduce();
          });
        });
      }
    }
    return 0;
  });
}

// The buckets: for each, the number of parameters and of elements (up to `cap` buckets written
// into `params` and `numels`); returns the count in *count.
int tch_peft_reducer_buckets(tch_peft_reducer* r, size_t cap, int64_t* params, int64_t* numels,
                             size_t* count, char** error) {
  return tch_peft::guarded<int>("tch_peft_reducer_buckets", error, 1, [&] {
    auto buckets = r->reducer->get_grad_buckets(/*return_zero_tensors=*/true);
    *count = buckets.size();
    for (size_t i = 0; i < buckets.size() && i < cap; ++i) {
      params[i] = static_cast<int64_t>(buckets[i].getParameters().size());
      numels[i] = buckets[i].getBuffer().numel();
    }
    return 0;
  });
}

}  // extern "C"
