// One AdamW step for a whole list of variables, in one pass over memory.
//
// XLA:CPU compiles the AdamW update of one variable into three loop kernels
// (m, v, then the variable re-reading the new m and v): 40 bytes moved per
// float32 parameter, and three kernel launches per variable. This op reads
// each element of (variable, gradient, m, v) once and writes (variable, m, v)
// once: the 28 bytes per parameter that AdamW must move, with one op launch
// for all variables. `tf_adamw/kernels/` builds and loads it; the
// optimizer uses it on CPU outside XLA and keeps the XLA step everywhere
// else (TPU, GPU, inside `jit_compile=True` functions).
//
// The op takes the model variables' handles but the slots through one
// `TfAdamwSlotTable` per device, made once at build(): see the table's
// comment for why.
//
// The arithmetic follows `tf_adamw/update.py::adamw_update` operation by
// operation (and is compiled with -ffp-contract=off), so both paths round
// alike.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/resource_mgr.h"
#include "tensorflow/core/framework/resource_var.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/platform/mutex.h"

namespace tf_adamw {
namespace {

using ::tensorflow::DataType;
using ::tensorflow::DataTypeString;
using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::Var;
using ::tensorflow::core::RefCountPtr;

// The optimizer's slots (momentums, velocities, and AMSGrad's velocity
// hats), held by one resource. A function that runs the fused step then has
// one input for all slots instead of one per slot: TF spends about 1.4 us per
// function input on every call, which was most of a step on 200 small
// variables. The table holds references to the slot variables' `Var`s, which
// live as long as the variables do: assigning or restoring a variable
// replaces the tensor inside its `Var`, so the table always sees the current
// values.
REGISTER_OP("TfAdamwSlotTable")
    .Input("momentums: num_variables * resource")
    .Input("velocities: num_variables * resource")
    .Input("velocity_hats: num_velocity_hats * resource")
    .Input("averages: num_averages * resource")
    .Output("table: resource")
    .Attr("num_variables: int >= 1")
    .Attr("num_velocity_hats: int >= 0")
    .Attr("num_averages: int >= 0")
    .SetIsStateful()
    .SetShapeFn(::tensorflow::shape_inference::ScalarShape)
    .Doc(R"doc(
A table of an optimizer's slot variables on one device, for TfAdamwFusedApply:
one momentum and one velocity per variable, a velocity hat (AMSGrad) or
none (num_velocity_hats = 0), and an EMA average or none (num_averages = 0).
)doc");

REGISTER_OP("TfAdamwFusedApply")
    .Input("variables: num_variables * resource")
    .Input("slot_table: resource")
    .Input("grads: num_variables * float")
    .Input("alpha: float")
    .Input("one_minus_beta_1: float")
    .Input("one_minus_beta_2: float")
    .Input("epsilon: float")
    .Input("decay: float")
    .Input("grad_scale: float")
    .Input("ema_momentum: float")
    .Input("ema_one_minus_momentum: float")
    .Input("apply: bool")
    .Attr("num_variables: int >= 1")
    .Attr("use_decay: list(bool)")
    .Attr("slot_indices: list(int)")
    .SetIsStateful()
    .SetShapeFn(::tensorflow::shape_inference::NoOutputs)
    .Doc(R"doc(
AdamW on a list of variables in one pass (tf_adamw's fused CPU step).

Variable i's slots are entry slot_indices[i] of slot_table (a
TfAdamwSlotTable; AMSGrad when it holds velocity hats). For each i, with
g = gradient * grad_scale (1 without global clipping):
if use_decay[i], variable -= variable * decay; then
m += (g - m) * one_minus_beta_1; v += (g*g - v) * one_minus_beta_2;
(AMSGrad) v_hat = max(v_hat, v); variable -= m * alpha / (sqrt(v or v_hat) +
epsilon); when the table holds averages, average = ema_momentum * average +
ema_one_minus_momentum * variable (the new value, as stored). Variables are
float32, bfloat16 or float16 (updated in float32); when apply is false the
inputs are checked and nothing changes (a skipped step without a
conditional around the op);
slots and gradients are float32, and gradient i has variable i's shape. All
inputs are checked before any value changes.
)doc");

class SlotTable : public ::tensorflow::ResourceBase {
 public:
  // Entry i of each kind belongs to one variable; velocity_hats is empty
  // without AMSGrad.
  SlotTable(std::vector<RefCountPtr<Var>> momentums,
            std::vector<RefCountPtr<Var>> velocities,
            std::vector<RefCountPtr<Var>> velocity_hats,
            std::vector<RefCountPtr<Var>> averages)
      : momentums_(std::move(momentums)),
        velocities_(std::move(velocities)),
        velocity_hats_(std::move(velocity_hats)),
        averages_(std::move(averages)) {}

  std::string DebugString() const override {
    return absl::StrCat("TfAdamwSlotTable of ", size(), " variables");
  }

  int size() const { return static_cast<int>(momentums_.size()); }
  bool amsgrad() const { return !velocity_hats_.empty(); }
  bool averaged() const { return !averages_.empty(); }
  Var* momentum(int i) const { return momentums_[i].get(); }
  Var* velocity(int i) const { return velocities_[i].get(); }
  Var* velocity_hat(int i) const { return velocity_hats_[i].get(); }
  Var* average(int i) const { return averages_[i].get(); }

 private:
  const std::vector<RefCountPtr<Var>> momentums_;
  const std::vector<RefCountPtr<Var>> velocities_;
  const std::vector<RefCountPtr<Var>> velocity_hats_;
  const std::vector<RefCountPtr<Var>> averages_;
};

class SlotTableOp : public OpKernel {
 public:
  explicit SlotTableOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("num_variables", &num_variables_));
    for (const char* attr : {"num_velocity_hats", "num_averages"}) {
      int count = 0;
      OP_REQUIRES_OK(ctx, ctx->GetAttr(attr, &count));
      OP_REQUIRES(ctx, count == 0 || count == num_variables_,
                  absl::InvalidArgumentError(
                      absl::StrCat(attr, " must be 0 or num_variables")));
    }
  }

  void Compute(OpKernelContext* ctx) override {
    // Inputs in order: momentums, velocities, velocity hats, averages.
    std::vector<RefCountPtr<Var>> kinds[4];
    const char* names[] = {"momentums", "velocities", "velocity_hats",
                           "averages"};
    int start = 0;
    for (int kind = 0; kind < 4; ++kind) {
      int begin = 0, end = 0;
      OP_REQUIRES_OK(ctx, ctx->op_kernel().InputRange(names[kind], &begin,
                                                      &end));
      for (int i = begin; i < end; ++i) {
        RefCountPtr<Var> slot;
        OP_REQUIRES_OK(ctx, ::tensorflow::LookupResource(
                                ctx, ::tensorflow::HandleFromInput(ctx, i),
                                &slot));
        kinds[kind].push_back(std::move(slot));
      }
      start = end;
    }
    (void)start;
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, {}, &out));
    // The handle owns the table: it is freed with the last tensor holding
    // the handle (the optimizer's, and any function that captured it).
    out->scalar<::tensorflow::ResourceHandle>()() =
        ::tensorflow::ResourceHandle::MakeRefCountingHandle(
            new SlotTable(std::move(kinds[0]), std::move(kinds[1]),
                          std::move(kinds[2]), std::move(kinds[3])),
            ctx->device()->name());
  }

 private:
  int num_variables_;
};

struct Scalars {
  float alpha, one_minus_beta_1, one_minus_beta_2, epsilon, decay;
  float grad_scale, ema_momentum, ema_one_minus_momentum;
};

// Elements [begin, end) of one variable. The loop body is, operation by
// operation, the global clip's `g * scale` (`update.clip_by_global_norm`),
// `adamw_update` and, when `average` is not null, `update.ema_update` of
// the value as stored.
template <typename T, bool kAmsgrad>
void UpdateRange(T* __restrict__ var, const float* __restrict__ grad,
                 float* __restrict__ m, float* __restrict__ v,
                 float* __restrict__ v_hat, float* __restrict__ average,
                 const Scalars& s, bool use_decay, int64_t begin,
                 int64_t end) {
  const float decay = s.decay;
  for (int64_t j = begin; j < end; ++j) {
    float x = static_cast<float>(var[j]);
    // Not `x * 0` for excluded variables: that would turn an infinite x
    // into NaN where the reference leaves it alone.
    if (use_decay) x = x - x * decay;
    const float g = grad[j] * s.grad_scale;
    const float new_m = m[j] + (g - m[j]) * s.one_minus_beta_1;
    const float new_v = v[j] + (g * g - v[j]) * s.one_minus_beta_2;
    m[j] = new_m;
    v[j] = new_v;
    float denominator_v = new_v;
    if (kAmsgrad) {
      denominator_v = std::max(v_hat[j], new_v);
      v_hat[j] = denominator_v;
    }
    x = x - (new_m * s.alpha) / (std::sqrt(denominator_v) + s.epsilon);
    const T stored = static_cast<T>(x);
    var[j] = stored;
    if (average != nullptr) {
      average[j] = s.ema_momentum * average[j] +
                   s.ema_one_minus_momentum * static_cast<float>(stored);
    }
  }
}

// Everything one variable's update needs, checked and ready to write.
struct Job {
  DataType dtype;
  void* var;
  const float* grad;
  float* m;
  float* v;
  float* v_hat;
  float* average;  // null without an EMA
  bool use_decay;
  int64_t size;
};

template <bool kAmsgrad>
void RunRange(const Job& job, const Scalars& s, int64_t begin, int64_t end) {
  switch (job.dtype) {
    case ::tensorflow::DT_FLOAT:
      UpdateRange<float, kAmsgrad>(static_cast<float*>(job.var), job.grad,
                                   job.m, job.v, job.v_hat, job.average, s,
                                   job.use_decay, begin, end);
      break;
    case ::tensorflow::DT_BFLOAT16:
      UpdateRange<::tensorflow::bfloat16, kAmsgrad>(
          static_cast<::tensorflow::bfloat16*>(job.var), job.grad, job.m,
          job.v, job.v_hat, job.average, s, job.use_decay, begin, end);
      break;
    case ::tensorflow::DT_HALF:
      UpdateRange<Eigen::half, kAmsgrad>(static_cast<Eigen::half*>(job.var),
                                         job.grad, job.m, job.v, job.v_hat,
                                         job.average, s, job.use_decay, begin,
                                         end);
      break;
    default:
      break;  // Rejected before any job runs.
  }
}

class FusedApplyOp : public OpKernel {
 public:
  explicit FusedApplyOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("num_variables", &num_variables_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("use_decay", &use_decay_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("slot_indices", &slot_indices_));
    OP_REQUIRES(ctx, static_cast<int>(use_decay_.size()) == num_variables_,
                absl::InvalidArgumentError(
                    "use_decay must have num_variables entries"));
    OP_REQUIRES(ctx,
                static_cast<int>(slot_indices_.size()) == num_variables_,
                absl::InvalidArgumentError(
                    "slot_indices must have num_variables entries"));
  }

  void Compute(OpKernelContext* ctx) override {
    const int n = num_variables_;
    const int grads_start = n + 1;
    const int scalars_start = grads_start + n;

    Scalars s;
    float* const fields[] = {&s.alpha, &s.one_minus_beta_1,
                             &s.one_minus_beta_2, &s.epsilon, &s.decay,
                             &s.grad_scale, &s.ema_momentum,
                             &s.ema_one_minus_momentum};
    for (int k = 0; k < 8; ++k) {
      const Tensor& t = ctx->input(scalars_start + k);
      OP_REQUIRES(ctx, ::tensorflow::TensorShapeUtils::IsScalar(t.shape()),
                  absl::InvalidArgumentError("hyperparameters must be scalars"));
      *fields[k] = t.scalar<float>()();
    }

    const Tensor& apply = ctx->input(scalars_start + 8);
    OP_REQUIRES(ctx, ::tensorflow::TensorShapeUtils::IsScalar(apply.shape()),
                absl::InvalidArgumentError("apply must be a scalar"));

    RefCountPtr<SlotTable> table;
    OP_REQUIRES_OK(ctx, ::tensorflow::LookupResource(
                            ctx, ::tensorflow::HandleFromInput(ctx, n),
                            &table));
    const bool amsgrad = table->amsgrad();
    const bool averaged = table->averaged();
    for (int i = 0; i < n; ++i) {
      OP_REQUIRES(ctx,
                  slot_indices_[i] >= 0 && slot_indices_[i] < table->size(),
                  absl::InvalidArgumentError(absl::StrCat(
                      "slot index ", slot_indices_[i], " of variable ", i,
                      " is outside the slot table of ", table->size(),
                      " variables")));
    }

    // Look up every variable, then lock each distinct mutex once, in address
    // order (the order TF's own training ops use, so no deadlock with them).
    // The table keeps its slots alive while `table` is held.
    std::vector<RefCountPtr<Var>> variables(n);
    for (int i = 0; i < n; ++i) {
      OP_REQUIRES_OK(ctx, ::tensorflow::LookupResource(
                              ctx, ::tensorflow::HandleFromInput(ctx, i),
                              &variables[i]));
    }
    std::vector<::tensorflow::mutex*> mutexes;
    mutexes.reserve((3 + amsgrad + averaged) * n);
    for (int i = 0; i < n; ++i) {
      const int k = slot_indices_[i];
      mutexes.push_back(variables[i]->mu());
      mutexes.push_back(table->momentum(k)->mu());
      mutexes.push_back(table->velocity(k)->mu());
      if (amsgrad) mutexes.push_back(table->velocity_hat(k)->mu());
      if (averaged) mutexes.push_back(table->average(k)->mu());
    }
    std::sort(mutexes.begin(), mutexes.end());
    mutexes.erase(std::unique(mutexes.begin(), mutexes.end()), mutexes.end());
    std::vector<::tensorflow::mutex_lock> locks;
    locks.reserve(mutexes.size());
    for (auto* mu : mutexes) locks.emplace_back(*mu);

    // Every check runs in this loop, before the first update below: an
    // error leaves every value as it was (`Writable` may give a buffer a
    // private copy, of the same values).
    std::vector<Job> jobs(n);
    for (int i = 0; i < n; ++i) {
      Var* var = variables[i].get();
      const int k = slot_indices_[i];
      OP_REQUIRES(ctx, var->is_initialized,
                  absl::FailedPreconditionError(absl::StrCat(
                      "variable ", i, " is not initialized")));
      const DataType dtype = var->tensor()->dtype();
      OP_REQUIRES(ctx,
                  dtype == ::tensorflow::DT_FLOAT ||
                      dtype == ::tensorflow::DT_BFLOAT16 ||
                      dtype == ::tensorflow::DT_HALF,
                  absl::InvalidArgumentError(absl::StrCat(
                      "variable ", i, " has dtype ", DataTypeString(dtype),
                      "; the fused step takes float32, bfloat16 or float16")));
      const int64_t size = var->tensor()->NumElements();
      const Tensor& grad = ctx->input(grads_start + i);
      // Full shapes, not just element counts: a [3,2] gradient must not
      // update a [2,3] variable in flat order.
      OP_REQUIRES_OK(ctx, CheckGradientShape(grad, *var->tensor(), i));
      Job& job = jobs[i];
      job.dtype = dtype;
      job.size = size;
      job.grad = grad.flat<float>().data();
      job.use_decay = use_decay_[i];
      OP_REQUIRES_OK(ctx, Writable(ctx, var, dtype, &job.var));
      void* slot = nullptr;
      OP_REQUIRES_OK(ctx, WritableSlot(ctx, table->momentum(k), size,
                                       "momentum", i, &slot));
      job.m = static_cast<float*>(slot);
      OP_REQUIRES_OK(ctx, WritableSlot(ctx, table->velocity(k), size,
                                       "velocity", i, &slot));
      job.v = static_cast<float*>(slot);
      job.v_hat = nullptr;
      if (amsgrad) {
        OP_REQUIRES_OK(ctx, WritableSlot(ctx, table->velocity_hat(k),
                                         size, "velocity_hat", i, &slot));
        job.v_hat = static_cast<float*>(slot);
      }
      job.average = nullptr;
      if (averaged) {
        OP_REQUIRES_OK(ctx, WritableSlot(ctx, table->average(k), size,
                                         "average", i, &slot));
        job.average = static_cast<float*>(slot);
      }
    }

    // The concatenation of all variables is cut into one contiguous range of
    // elements per thread; a step smaller than kMinPerThread elements per
    // thread runs inline (thread hand-off would cost more than it saves).
    if (!apply.scalar<bool>()()) return;

    constexpr int64_t kMinPerThread = 1 << 17;
    std::vector<int64_t> starts(n + 1, 0);
    for (int i = 0; i < n; ++i) starts[i + 1] = starts[i] + jobs[i].size;
    const int64_t total = starts[n];
    auto run_elements = [&](int64_t first, int64_t last) {
      int i = static_cast<int>(
          std::upper_bound(starts.begin(), starts.end(), first) -
          starts.begin() - 1);
      for (; i < n && starts[i] < last; ++i) {
        const int64_t begin = std::max(first, starts[i]) - starts[i];
        const int64_t end = std::min(last, starts[i + 1]) - starts[i];
        if (begin >= end) continue;
        if (amsgrad) {
          RunRange<true>(jobs[i], s, begin, end);
        } else {
          RunRange<false>(jobs[i], s, begin, end);
        }
      }
    };
    auto* workers = ctx->device()->tensorflow_cpu_worker_threads();
    const int64_t threads =
        workers == nullptr ? 1
                           : std::min<int64_t>(workers->num_threads,
                                               total / kMinPerThread);
    if (threads <= 1) {
      run_elements(0, total);
      return;
    }
    // Ranges are multiples of 16 elements (64-byte cache lines of float32).
    const int64_t per_thread = ((total + threads - 1) / threads + 15) / 16 * 16;
    workers->workers->ParallelFor(
        threads, /*cost_per_unit=*/per_thread * 28,
        [&](int64_t first_shard, int64_t last_shard) {
          for (int64_t k = first_shard; k < last_shard; ++k) {
            run_elements(k * per_thread, std::min(total, (k + 1) * per_thread));
          }
        });
  }

 private:
  // A pointer to the variable's buffer that no reader shares (TF's
  // copy-on-write rule for resource variables, as in training_op_helpers.h).
  static absl::Status Writable(OpKernelContext* ctx, Var* var, DataType dtype,
                               void** out) {
    Tensor* tensor = var->tensor();
    if (var->copy_on_read_mode.load() || !tensor->RefCountIsOne()) {
      Tensor copy;
      TF_RETURN_IF_ERROR(
          ctx->allocate_temp(dtype, tensor->shape(), &copy));
      std::copy_n(static_cast<const char*>(tensor->data()),
                  tensor->TotalBytes(), static_cast<char*>(copy.data()));
      *tensor = copy;
    }
    *out = tensor->data();
    return absl::OkStatus();
  }

  static absl::Status CheckGradientShape(const Tensor& grad,
                                         const Tensor& var, int i) {
    if (grad.shape() == var.shape()) return absl::OkStatus();
    const std::string shapes =
        absl::StrCat("gradient ", i, " has shape ", grad.shape().DebugString(),
                     "; its variable has shape ", var.shape().DebugString());
    if (grad.NumElements() == var.NumElements()) {
      return absl::InvalidArgumentError(shapes);
    }
    return absl::InvalidArgumentError(absl::StrCat(
        "gradient ", i, " has ", grad.NumElements(),
        " elements; its variable has ", var.NumElements(), " (", shapes,
        ")"));
  }

  static absl::Status WritableSlot(OpKernelContext* ctx, Var* slot,
                                   int64_t size, const char* kind, int i,
                                   void** out) {
    if (!slot->is_initialized) {
      return absl::FailedPreconditionError(
          absl::StrCat(kind, " of variable ", i, " is not initialized"));
    }
    if (slot->tensor()->dtype() != ::tensorflow::DT_FLOAT ||
        slot->tensor()->NumElements() != size) {
      return absl::InvalidArgumentError(absl::StrCat(
          kind, " of variable ", i, " must be float32 with ", size,
          " elements; it is ", DataTypeString(slot->tensor()->dtype()),
          " with ", slot->tensor()->NumElements()));
    }
    return Writable(ctx, slot, ::tensorflow::DT_FLOAT, out);
  }

  int num_variables_;
  std::vector<bool> use_decay_;
  std::vector<int> slot_indices_;
};

REGISTER_KERNEL_BUILDER(Name("TfAdamwFusedApply")
                            .Device(::tensorflow::DEVICE_CPU)
                            .HostMemory("alpha")
                            .HostMemory("one_minus_beta_1")
                            .HostMemory("one_minus_beta_2")
                            .HostMemory("epsilon")
                            .HostMemory("decay")
                            .HostMemory("grad_scale")
                            .HostMemory("ema_momentum")
                            .HostMemory("ema_one_minus_momentum")
                            .HostMemory("apply"),
                        FusedApplyOp);

REGISTER_KERNEL_BUILDER(
    Name("TfAdamwSlotTable").Device(::tensorflow::DEVICE_CPU), SlotTableOp);

}  // namespace
}  // namespace tf_adamw
