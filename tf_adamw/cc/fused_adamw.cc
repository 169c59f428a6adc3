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
    .Input("accumulators: num_accumulators * resource")
    .Output("table: resource")
    .Attr("num_variables: int >= 1")
    .Attr("num_velocity_hats: int >= 0")
    .Attr("num_averages: int >= 0")
    .Attr("num_accumulators: int >= 0 = 0")
    .Attr("packed_rows: int >= 0 = 0")
    .SetIsStateful()
    .SetShapeFn(::tensorflow::shape_inference::ScalarShape)
    .Doc(R"doc(
A table of an optimizer's slot variables on one device, for TfAdamwFusedApply:
one momentum and one velocity per variable, a velocity hat (AMSGrad) or
none (num_velocity_hats = 0), an EMA average or none (num_averages = 0), and
a gradient accumulator or none (num_accumulators = 0). With packed_rows = k
> 0 the slots are packed (tf_adamw's slot_layout="packed"): entry i of every
kind is the same variable of k times variable i's elements, and each kind
present, in the order above, is one row of it (momentum row 0, velocity row
1, then the velocity hat, average and accumulator rows when present).
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
    .Input("accumulate: bool")
    .Input("accumulation_steps: float")
    .Attr("num_variables: int >= 1")
    .Attr("use_decay: list(bool)")
    .Attr("slot_indices: list(int)")
    .Attr("first_variable: int = 0")
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
conditional around the op). When the table holds accumulators (gradient
accumulation) and accumulation_steps is not 0, the gradient above is the
mean (accumulator + gradient) / accumulation_steps and the accumulator is
then zeroed; a call with accumulate true (and apply false) only adds,
accumulator += gradient. Apply and accumulate are never both true. With
accumulation_steps 0 the accumulators are left alone. Error messages number
the variables from first_variable (an op updating part of a list);
slots and gradients are float32, and gradient i has variable i's shape. All
inputs are checked before any value changes.
)doc");

// One slot of one variable: a whole variable (separate slots, rows = 1),
// or row `row` of a variable of `rows` slots of equal size (packed slots).
struct Slot {
  Var* var;
  int row;
  int rows;
};

class SlotTable : public ::tensorflow::ResourceBase {
 public:
  // Entry i of each kind belongs to one variable; velocity_hats is empty
  // without AMSGrad, averages without an EMA, accumulators without gradient
  // accumulation.
  SlotTable(std::vector<RefCountPtr<Var>> momentums,
            std::vector<RefCountPtr<Var>> velocities,
            std::vector<RefCountPtr<Var>> velocity_hats,
            std::vector<RefCountPtr<Var>> averages,
            std::vector<RefCountPtr<Var>> accumulators, int packed_rows)
      : momentums_(std::move(momentums)),
        velocities_(std::move(velocities)),
        velocity_hats_(std::move(velocity_hats)),
        averages_(std::move(averages)),
        accumulators_(std::move(accumulators)),
        rows_(packed_rows == 0 ? 1 : packed_rows) {
    // Packed: each kind present is the next row, in the kinds' order.
    int row = 0;
    const std::vector<RefCountPtr<Var>>* kinds[] = {
        &momentums_, &velocities_, &velocity_hats_, &averages_,
        &accumulators_};
    for (int kind = 0; kind < 5; ++kind) {
      row_[kind] = 0;
      if (packed_rows != 0 && !kinds[kind]->empty()) row_[kind] = row++;
    }
  }

  std::string DebugString() const override {
    return absl::StrCat("TfAdamwSlotTable of ", size(), " variables");
  }

  int size() const { return static_cast<int>(momentums_.size()); }
  bool amsgrad() const { return !velocity_hats_.empty(); }
  bool averaged() const { return !averages_.empty(); }
  bool accumulates() const { return !accumulators_.empty(); }
  Slot momentum(int i) const { return {momentums_[i].get(), row_[0], rows_}; }
  Slot velocity(int i) const {
    return {velocities_[i].get(), row_[1], rows_};
  }
  Slot velocity_hat(int i) const {
    return {velocity_hats_[i].get(), row_[2], rows_};
  }
  Slot average(int i) const { return {averages_[i].get(), row_[3], rows_}; }
  Slot accumulator(int i) const {
    return {accumulators_[i].get(), row_[4], rows_};
  }

 private:
  const std::vector<RefCountPtr<Var>> momentums_;
  const std::vector<RefCountPtr<Var>> velocities_;
  const std::vector<RefCountPtr<Var>> velocity_hats_;
  const std::vector<RefCountPtr<Var>> averages_;
  const std::vector<RefCountPtr<Var>> accumulators_;
  const int rows_;  // slots per variable of the table: 1 unless packed
  int row_[5];      // each kind's row (0 unless packed)
};

class SlotTableOp : public OpKernel {
 public:
  explicit SlotTableOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("num_variables", &num_variables_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("packed_rows", &packed_rows_));
    int kinds = 2;
    for (const char* attr :
         {"num_velocity_hats", "num_averages", "num_accumulators"}) {
      int count = 0;
      OP_REQUIRES_OK(ctx, ctx->GetAttr(attr, &count));
      OP_REQUIRES(ctx, count == 0 || count == num_variables_,
                  absl::InvalidArgumentError(
                      absl::StrCat(attr, " must be 0 or num_variables")));
      if (count != 0) ++kinds;
    }
    OP_REQUIRES(ctx, packed_rows_ == 0 || packed_rows_ == kinds,
                absl::InvalidArgumentError(absl::StrCat(
                    "packed_rows is ", packed_rows_, " but the table holds ",
                    kinds, " slot kinds (0: separate slots)")));
  }

  void Compute(OpKernelContext* ctx) override {
    // Inputs in order: momentums, velocities, velocity hats, averages,
    // accumulators.
    std::vector<RefCountPtr<Var>> kinds[5];
    const char* names[] = {"momentums", "velocities", "velocity_hats",
                           "averages", "accumulators"};
    int start = 0;
    for (int kind = 0; kind < 5; ++kind) {
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
                          std::move(kinds[2]), std::move(kinds[3]),
                          std::move(kinds[4]), packed_rows_),
            ctx->device()->name());
  }

 private:
  int num_variables_;
  int packed_rows_ = 0;
};

struct Scalars {
  float alpha, one_minus_beta_1, one_minus_beta_2, epsilon, decay;
  float grad_scale, ema_momentum, ema_one_minus_momentum;
  float accumulation_steps;
};

// Elements [begin, end) of one variable. The loop body is, operation by
// operation, the accumulation stage's mean `(accumulator + gradient) / k`
// (the accumulator is then zeroed), the global clip's `g * scale`
// (`update.clip_by_global_norm`), `adamw_update` and, with an average,
// `update.ema_update` of the value as stored. Every option is a template
// flag, so the body has no branch and the compiler vectorises it (IEEE
// vector add, mul, div and sqrt round as the scalar ones do; no FMA).
template <typename T, bool kAmsgrad, bool kDecay, bool kAccumulate,
          bool kAverage>
void UpdateRange(T* __restrict__ var, const float* __restrict__ grad,
                 float* __restrict__ accumulator, float* __restrict__ m,
                 float* __restrict__ v, float* __restrict__ v_hat,
                 float* __restrict__ average, const Scalars& s,
                 int64_t begin, int64_t end) {
  const float decay = s.decay, grad_scale = s.grad_scale;
  const float one_minus_beta_1 = s.one_minus_beta_1;
  const float one_minus_beta_2 = s.one_minus_beta_2;
  const float alpha = s.alpha, epsilon = s.epsilon;
  const float ema_momentum = s.ema_momentum;
  const float ema_one_minus_momentum = s.ema_one_minus_momentum;
  const float accumulation_steps = s.accumulation_steps;
  for (int64_t j = begin; j < end; ++j) {
    float x = static_cast<float>(var[j]);
    // Not `x * 0` for excluded variables: that would turn an infinite x
    // into NaN where the reference leaves it alone.
    if (kDecay) x = x - x * decay;
    float g = grad[j];
    if (kAccumulate) {
      g = (accumulator[j] + g) / accumulation_steps;
      accumulator[j] = 0.0f;
    }
    g = g * grad_scale;
    const float new_m = m[j] + (g - m[j]) * one_minus_beta_1;
    const float new_v = v[j] + (g * g - v[j]) * one_minus_beta_2;
    m[j] = new_m;
    v[j] = new_v;
    float denominator_v = new_v;
    if (kAmsgrad) {
      denominator_v = std::max(v_hat[j], new_v);
      v_hat[j] = denominator_v;
    }
    x = x - (new_m * alpha) / (std::sqrt(denominator_v) + epsilon);
    const T stored = static_cast<T>(x);
    var[j] = stored;
    if (kAverage) {
      average[j] = ema_momentum * average[j] +
                   ema_one_minus_momentum * static_cast<float>(stored);
    }
  }
}

// Everything one variable's update needs, checked and ready to write.
struct Job {
  DataType dtype;
  void* var;
  const float* grad;
  float* accumulator;  // null without gradient accumulation
  float* m;
  float* v;
  float* v_hat;
  float* average;  // null without an EMA
  bool use_decay;
  int64_t size;
};

using RangeFn = void (*)(const Job&, const Scalars&, int64_t, int64_t);

// UpdateRange for one dtype and the flags packed in kFlags (bit 0: decay,
// 1: accumulate, 2: average).
template <typename T, bool kAmsgrad, int kFlags>
void UpdateJobRange(const Job& job, const Scalars& s, int64_t begin,
                    int64_t end) {
  UpdateRange<T, kAmsgrad, (kFlags & 1) != 0, (kFlags & 2) != 0,
              (kFlags & 4) != 0>(static_cast<T*>(job.var), job.grad,
                                 job.accumulator, job.m, job.v, job.v_hat,
                                 job.average, s, begin, end);
}

template <typename T, bool kAmsgrad>
RangeFn RangeFor(int flags) {
  static constexpr RangeFn kByFlags[8] = {
      &UpdateJobRange<T, kAmsgrad, 0>, &UpdateJobRange<T, kAmsgrad, 1>,
      &UpdateJobRange<T, kAmsgrad, 2>, &UpdateJobRange<T, kAmsgrad, 3>,
      &UpdateJobRange<T, kAmsgrad, 4>, &UpdateJobRange<T, kAmsgrad, 5>,
      &UpdateJobRange<T, kAmsgrad, 6>, &UpdateJobRange<T, kAmsgrad, 7>};
  return kByFlags[flags];
}

template <bool kAmsgrad>
void RunRange(const Job& job, const Scalars& s, int64_t begin, int64_t end) {
  const int flags = (job.use_decay ? 1 : 0) |
                    (job.accumulator != nullptr ? 2 : 0) |
                    (job.average != nullptr ? 4 : 0);
  switch (job.dtype) {
    case ::tensorflow::DT_FLOAT:
      RangeFor<float, kAmsgrad>(flags)(job, s, begin, end);
      break;
    case ::tensorflow::DT_BFLOAT16:
      RangeFor<::tensorflow::bfloat16, kAmsgrad>(flags)(job, s, begin, end);
      break;
    case ::tensorflow::DT_HALF:
      RangeFor<Eigen::half, kAmsgrad>(flags)(job, s, begin, end);
      break;
    default:
      break;  // Rejected before any job runs.
  }
}

// Runs `range(i, begin, end)` over elements [begin, end) of item i, for
// items of `sizes` elements taken as one concatenation: cut into one
// contiguous range per thread, inline when that is smaller than
// kMinPerThread elements per thread (a thread hand-off would cost more than
// it saves). `bytes_per_element`: the memory each element moves.
template <typename Range>
void ForEachRange(OpKernelContext* ctx, const std::vector<int64_t>& sizes,
                  int64_t bytes_per_element, const Range& range) {
  constexpr int64_t kMinPerThread = 1 << 17;
  const int n = static_cast<int>(sizes.size());
  std::vector<int64_t> starts(n + 1, 0);
  for (int i = 0; i < n; ++i) starts[i + 1] = starts[i] + sizes[i];
  const int64_t total = starts[n];
  auto run_elements = [&](int64_t first, int64_t last) {
    int i = static_cast<int>(
        std::upper_bound(starts.begin(), starts.end(), first) -
        starts.begin() - 1);
    for (; i < n && starts[i] < last; ++i) {
      const int64_t begin = std::max(first, starts[i]) - starts[i];
      const int64_t end = std::min(last, starts[i + 1]) - starts[i];
      if (begin < end) range(i, begin, end);
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
      threads, /*cost_per_unit=*/per_thread * bytes_per_element,
      [&](int64_t first_shard, int64_t last_shard) {
        for (int64_t k = first_shard; k < last_shard; ++k) {
          run_elements(k * per_thread, std::min(total, (k + 1) * per_thread));
        }
      });
}

// Reads a scalar input of type T, or fails naming it.
template <typename T>
absl::Status ScalarInput(OpKernelContext* ctx, const char* name, T* out) {
  const Tensor* t = nullptr;
  TF_RETURN_IF_ERROR(ctx->input(name, &t));
  if (!::tensorflow::TensorShapeUtils::IsScalar(t->shape())) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, " must be a scalar; it has shape ",
                     t->shape().DebugString()));
  }
  *out = t->scalar<T>()();
  return absl::OkStatus();
}

// The accumulation steps k: a finite k >= 1, or 0 where `zero_means_none`
// (a step that leaves the accumulators alone).
absl::Status CheckAccumulationSteps(float k, bool zero_means_none) {
  if ((std::isfinite(k) && k >= 1.0f) || (zero_means_none && k == 0.0f)) {
    return absl::OkStatus();
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "accumulation_steps must be at least 1",
      zero_means_none ? " or 0" : "", "; it is ", k));
}

// A pointer to the variable's buffer that no reader shares (TF's
// copy-on-write rule for resource variables, as in training_op_helpers.h).
absl::Status Writable(OpKernelContext* ctx, Var* var, DataType dtype,
                      void** out) {
  Tensor* tensor = var->tensor();
  if (var->copy_on_read_mode.load() || !tensor->RefCountIsOne()) {
    Tensor copy;
    TF_RETURN_IF_ERROR(ctx->allocate_temp(dtype, tensor->shape(), &copy));
    std::copy_n(static_cast<const char*>(tensor->data()),
                tensor->TotalBytes(), static_cast<char*>(copy.data()));
    *tensor = copy;
  }
  *out = tensor->data();
  return absl::OkStatus();
}

// Checks slot `kind` of variable i (initialized, float32, `size`
// elements; packed: its variable has `slot.rows` times that); sets `*data`
// (when not null) to the slot's first element, and when `out` is not null,
// sets it to the slot's first element in a writable buffer. `writable`
// lists the variables made writable for this variable so far: a packed
// variable is made writable once (a second copy, in copy-on-read mode,
// would leave the rows already handed out in the first).
absl::Status CheckSlot(OpKernelContext* ctx, const Slot& slot, int64_t size,
                       const char* kind, int i, void** out,
                       const float** data = nullptr,
                       std::vector<Var*>* writable = nullptr) {
  Var* var = slot.var;
  if (!var->is_initialized) {
    return absl::FailedPreconditionError(
        absl::StrCat(kind, " of variable ", i, " is not initialized"));
  }
  if (var->tensor()->dtype() != ::tensorflow::DT_FLOAT ||
      var->tensor()->NumElements() != size * slot.rows) {
    return absl::InvalidArgumentError(absl::StrCat(
        kind, " of variable ", i, " must be float32 with ", size * slot.rows,
        " elements", slot.rows > 1 ? absl::StrCat(" (", slot.rows, " packed "
                                                  "rows of ", size, ")")
                                   : "",
        "; it is ", DataTypeString(var->tensor()->dtype()), " with ",
        var->tensor()->NumElements()));
  }
  const int64_t offset = static_cast<int64_t>(slot.row) * size;
  if (data != nullptr) *data = var->tensor()->flat<float>().data() + offset;
  if (out == nullptr) return absl::OkStatus();
  if (writable == nullptr ||
      std::find(writable->begin(), writable->end(), var) == writable->end()) {
    TF_RETURN_IF_ERROR(Writable(ctx, var, ::tensorflow::DT_FLOAT, out));
    if (writable != nullptr) writable->push_back(var);
  }
  *out = var->tensor()->flat<float>().data() + offset;
  return absl::OkStatus();
}

// Every distinct mutex of `vars`, sorted by address: locking them in that
// order is the order TF's own training ops use, so no deadlock with them.
std::vector<::tensorflow::mutex*> SortedMutexes(const std::vector<Var*>& vars) {
  std::vector<::tensorflow::mutex*> mutexes;
  mutexes.reserve(vars.size());
  for (Var* var : vars) mutexes.push_back(var->mu());
  std::sort(mutexes.begin(), mutexes.end());
  mutexes.erase(std::unique(mutexes.begin(), mutexes.end()), mutexes.end());
  return mutexes;
}

// The attributes both ops have about their list of variables.
struct VariableList {
  int num_variables = 0;
  std::vector<int> slot_indices;  // each variable's entry in the slot table
  int first_variable = 0;         // the number error messages give variable 0

  absl::Status Read(OpKernelConstruction* ctx) {
    TF_RETURN_IF_ERROR(ctx->GetAttr("num_variables", &num_variables));
    TF_RETURN_IF_ERROR(ctx->GetAttr("slot_indices", &slot_indices));
    TF_RETURN_IF_ERROR(ctx->GetAttr("first_variable", &first_variable));
    if (static_cast<int>(slot_indices.size()) != num_variables) {
      return absl::InvalidArgumentError(
          "slot_indices must have num_variables entries");
    }
    return absl::OkStatus();
  }

  // Every slot index is an entry of `table`.
  absl::Status CheckSlotIndices(const SlotTable& table) const {
    for (int i = 0; i < num_variables; ++i) {
      if (slot_indices[i] < 0 || slot_indices[i] >= table.size()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "slot index ", slot_indices[i], " of variable ",
            first_variable + i, " is outside the slot table of ",
            table.size(), " variables"));
      }
    }
    return absl::OkStatus();
  }
};

class FusedApplyOp : public OpKernel {
 public:
  explicit FusedApplyOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, list_.Read(ctx));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("use_decay", &use_decay_));
    OP_REQUIRES(ctx,
                static_cast<int>(use_decay_.size()) == list_.num_variables,
                absl::InvalidArgumentError(
                    "use_decay must have num_variables entries"));
  }

  void Compute(OpKernelContext* ctx) override {
    const int n = list_.num_variables;
    Scalars s;
    bool apply = true, accumulate = false;
    OP_REQUIRES_OK(ctx, ReadScalars(ctx, &s, &apply, &accumulate));

    RefCountPtr<SlotTable> table;
    OP_REQUIRES_OK(ctx, ::tensorflow::LookupResource(
                            ctx, ::tensorflow::HandleFromInput(ctx, n),
                            &table));
    OP_REQUIRES_OK(ctx, list_.CheckSlotIndices(*table));
    OP_REQUIRES_OK(ctx, CheckAccumulationSteps(s.accumulation_steps,
                                               /*zero_means_none=*/true));
    const bool accumulating =
        table->accumulates() && s.accumulation_steps != 0.0f;
    OP_REQUIRES(ctx, !accumulate || accumulating,
                absl::InvalidArgumentError(
                    "accumulate is true, but the slot table holds no "
                    "accumulators or accumulation_steps is 0"));
    OP_REQUIRES(ctx, !(apply && accumulate),
                absl::InvalidArgumentError(
                    "apply and accumulate are both true; a call either "
                    "applies or only accumulates"));

    // Look up every variable, then lock each distinct mutex once. The
    // table keeps its slots alive while `table` is held.
    std::vector<RefCountPtr<Var>> variables(n);
    for (int i = 0; i < n; ++i) {
      OP_REQUIRES_OK(ctx, ::tensorflow::LookupResource(
                              ctx, ::tensorflow::HandleFromInput(ctx, i),
                              &variables[i]));
    }
    std::vector<::tensorflow::mutex_lock> locks;
    for (auto* mu :
         SortedMutexes(Touched(variables, *table, accumulating))) {
      locks.emplace_back(*mu);
    }

    // Every check runs here, before the first write below: an error leaves
    // every value as it was (`Writable` may give a buffer a private copy,
    // of the same values). Only buffers this call writes are made
    // writable.
    std::vector<Job> jobs(n);
    std::vector<int64_t> sizes(n);
    for (int i = 0; i < n; ++i) {
      OP_REQUIRES_OK(ctx, PrepareJob(ctx, variables[i].get(), *table, i,
                                     apply, accumulate, accumulating,
                                     &jobs[i]));
      sizes[i] = jobs[i].size;
    }
    if (apply) {
      const bool amsgrad = table->amsgrad();
      ForEachRange(ctx, sizes, /*bytes_per_element=*/28,
                   [&](int i, int64_t begin, int64_t end) {
                     if (amsgrad) {
                       RunRange<true>(jobs[i], s, begin, end);
                     } else {
                       RunRange<false>(jobs[i], s, begin, end);
                     }
                   });
    } else if (accumulate) {
      // The accumulation stage's micro-step: accumulator + gradient.
      ForEachRange(ctx, sizes, /*bytes_per_element=*/12,
                   [&](int i, int64_t begin, int64_t end) {
                     float* __restrict__ a = jobs[i].accumulator;
                     const float* __restrict__ g = jobs[i].grad;
                     for (int64_t j = begin; j < end; ++j) a[j] = a[j] + g[j];
                   });
    }
  }

 private:
  // The float32 scalars (in the order of `Scalars`), then the flags.
  static absl::Status ReadScalars(OpKernelContext* ctx, Scalars* s,
                                  bool* apply, bool* accumulate) {
    const std::pair<const char*, float*> fields[] = {
        {"alpha", &s->alpha},
        {"one_minus_beta_1", &s->one_minus_beta_1},
        {"one_minus_beta_2", &s->one_minus_beta_2},
        {"epsilon", &s->epsilon},
        {"decay", &s->decay},
        {"grad_scale", &s->grad_scale},
        {"ema_momentum", &s->ema_momentum},
        {"ema_one_minus_momentum", &s->ema_one_minus_momentum},
        {"accumulation_steps", &s->accumulation_steps}};
    for (const auto& field : fields) {
      TF_RETURN_IF_ERROR(ScalarInput(ctx, field.first, field.second));
    }
    TF_RETURN_IF_ERROR(ScalarInput(ctx, "apply", apply));
    return ScalarInput(ctx, "accumulate", accumulate);
  }

  // Every variable and slot the call may write.
  std::vector<Var*> Touched(const std::vector<RefCountPtr<Var>>& variables,
                            const SlotTable& table, bool accumulating) const {
    std::vector<Var*> touched;
    touched.reserve(6 * variables.size());
    for (size_t i = 0; i < variables.size(); ++i) {
      const int k = list_.slot_indices[i];
      touched.push_back(variables[i].get());
      // Packed slots list their variable once per kind: SortedMutexes
      // locks it once.
      touched.push_back(table.momentum(k).var);
      touched.push_back(table.velocity(k).var);
      if (table.amsgrad()) touched.push_back(table.velocity_hat(k).var);
      if (table.averaged()) touched.push_back(table.average(k).var);
      if (accumulating) touched.push_back(table.accumulator(k).var);
    }
    return touched;
  }

  // Checks variable i and its slots and fills `job`; the buffers the call
  // writes (all of them when `apply`, the accumulator when `accumulate`)
  // are made writable. `accumulating`: the call uses the accumulators.
  absl::Status PrepareJob(OpKernelContext* ctx, Var* var,
                          const SlotTable& table, int i, bool apply,
                          bool accumulate, bool accumulating,
                          Job* job) const {
    const int k = list_.slot_indices[i];
    const int name = list_.first_variable + i;  // in error messages
    if (!var->is_initialized) {
      return absl::FailedPreconditionError(
          absl::StrCat("variable ", name, " is not initialized"));
    }
    const DataType dtype = var->tensor()->dtype();
    if (dtype != ::tensorflow::DT_FLOAT &&
        dtype != ::tensorflow::DT_BFLOAT16 && dtype != ::tensorflow::DT_HALF) {
      return absl::InvalidArgumentError(absl::StrCat(
          "variable ", name, " has dtype ", DataTypeString(dtype),
          "; the fused step takes float32, bfloat16 or float16"));
    }
    const int64_t size = var->tensor()->NumElements();
    const Tensor& grad = ctx->input(list_.num_variables + 1 + i);
    // Full shapes, not just element counts: a [3,2] gradient must not
    // update a [2,3] variable in flat order.
    TF_RETURN_IF_ERROR(CheckGradientShape(grad, *var->tensor(), name));
    job->dtype = dtype;
    job->size = size;
    job->grad = grad.flat<float>().data();
    job->use_decay = use_decay_[i];
    job->var = var->tensor()->data();
    if (apply) TF_RETURN_IF_ERROR(Writable(ctx, var, dtype, &job->var));
    void* slot = nullptr;
    void** out = apply ? &slot : nullptr;
    std::vector<Var*> writable;  // of this variable's slots
    TF_RETURN_IF_ERROR(CheckSlot(ctx, table.momentum(k), size, "momentum", name,
                                 out, nullptr, &writable));
    job->m = static_cast<float*>(slot);
    TF_RETURN_IF_ERROR(CheckSlot(ctx, table.velocity(k), size, "velocity", name,
                                 out, nullptr, &writable));
    job->v = static_cast<float*>(slot);
    slot = nullptr;
    if (table.amsgrad()) {
      TF_RETURN_IF_ERROR(CheckSlot(ctx, table.velocity_hat(k), size,
                                   "velocity_hat", name, out, nullptr,
                                   &writable));
    }
    job->v_hat = static_cast<float*>(slot);
    slot = nullptr;
    if (table.averaged()) {
      TF_RETURN_IF_ERROR(CheckSlot(ctx, table.average(k), size, "average", name,
                                   out, nullptr, &writable));
    }
    job->average = static_cast<float*>(slot);
    slot = nullptr;
    if (accumulating) {
      TF_RETURN_IF_ERROR(CheckSlot(ctx, table.accumulator(k), size,
                                   "accumulator", name,
                                   apply || accumulate ? &slot : nullptr,
                                   nullptr, &writable));
    }
    job->accumulator = static_cast<float*>(slot);
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

  VariableList list_;
  std::vector<bool> use_decay_;
};

REGISTER_OP("TfAdamwAccumulatedMeans")
    .Input("slot_table: resource")
    .Input("grads: num_variables * float")
    .Input("accumulation_steps: float")
    .Input("compute: bool")
    .Output("means: float")
    .Attr("num_variables: int >= 1")
    .Attr("slot_indices: list(int)")
    .Attr("first_variable: int = 0")
    .SetIsStateful()
    .SetShapeFn([](::tensorflow::shape_inference::InferenceContext* c) {
      c->set_output(0, c->Vector(c->UnknownDim()));
      return absl::OkStatus();
    })
    .Doc(R"doc(
The mean gradients an accumulating fused step would apply, as one flat
concatenation of (accumulator + gradient) / accumulation_steps for each
variable i, whose accumulator is entry slot_indices[i] of slot_table. The
pipeline's global clip takes their norm with the same TF reduction as the
plain-ops step, so both round alike. When compute is false the output is
empty (a call that only accumulates needs no norm). Changes nothing. Error
messages number the variables from first_variable.
)doc");

class AccumulatedMeansOp : public OpKernel {
 public:
  explicit AccumulatedMeansOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, list_.Read(ctx));
  }

  void Compute(OpKernelContext* ctx) override {
    const int n = list_.num_variables;
    float k = 0.0f;
    bool compute = false;
    OP_REQUIRES_OK(ctx, ScalarInput(ctx, "accumulation_steps", &k));
    OP_REQUIRES_OK(ctx, ScalarInput(ctx, "compute", &compute));
    RefCountPtr<SlotTable> table;
    OP_REQUIRES_OK(ctx, ::tensorflow::LookupResource(
                            ctx, ::tensorflow::HandleFromInput(ctx, 0),
                            &table));
    OP_REQUIRES(ctx, table->accumulates(),
                absl::InvalidArgumentError(
                    "the slot table holds no accumulators"));
    OP_REQUIRES_OK(ctx, list_.CheckSlotIndices(*table));
    OP_REQUIRES_OK(ctx, CheckAccumulationSteps(k, /*zero_means_none=*/false));
    Tensor* out = nullptr;
    if (!compute) {
      OP_REQUIRES_OK(ctx, ctx->allocate_output(0, {0}, &out));
      return;
    }
    std::vector<Slot> accumulators(n);
    std::vector<Var*> vars(n);
    for (int i = 0; i < n; ++i) {
      accumulators[i] = table->accumulator(list_.slot_indices[i]);
      vars[i] = accumulators[i].var;
    }
    std::vector<::tensorflow::tf_shared_lock> locks;
    for (auto* mu : SortedMutexes(vars)) locks.emplace_back(*mu);
    std::vector<int64_t> sizes(n), offsets(n, 0);
    std::vector<const float*> grads(n), sums(n);
    int64_t total = 0;
    for (int i = 0; i < n; ++i) {
      const Tensor& grad = ctx->input(1 + i);
      sizes[i] = grad.NumElements();
      OP_REQUIRES_OK(ctx, CheckSlot(ctx, accumulators[i], sizes[i],
                                    "accumulator", list_.first_variable + i,
                                    nullptr, &sums[i]));
      grads[i] = grad.flat<float>().data();
      offsets[i] = total;
      total += sizes[i];
    }
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, {total}, &out));
    float* const means = out->flat<float>().data();
    ForEachRange(ctx, sizes, /*bytes_per_element=*/12,
                 [&](int i, int64_t begin, int64_t end) {
                   float* __restrict__ mean = means + offsets[i];
                   for (int64_t j = begin; j < end; ++j) {
                     mean[j] = (sums[i][j] + grads[i][j]) / k;
                   }
                 });
  }

 private:
  VariableList list_;
};

REGISTER_OP("TfAdamwFlatConcat")
    .Input("values: N * T")
    .Output("flat: T")
    .Attr("N: int >= 1")
    .Attr("T: {half, bfloat16, float, double}")
    .SetShapeFn([](::tensorflow::shape_inference::InferenceContext* c) {
      int64_t total = 0;
      for (int i = 0; i < c->num_inputs(); ++i) {
        const int64_t n = c->Value(c->NumElements(c->input(i)));
        if (n == ::tensorflow::shape_inference::InferenceContext::kUnknownDim) {
          c->set_output(0, c->Vector(c->UnknownDim()));
          return absl::OkStatus();
        }
        total += n;
      }
      c->set_output(0, c->Vector(total));
      return absl::OkStatus();
    })
    .Doc(R"doc(
The elements of every input in row-major order, concatenated into one
vector, as tf.concat([tf.reshape(v, [-1]) for v in values], 0) in one op.
The global norm's sum of squares takes it, so that a step on n variables
adds one op to its graph instead of 2n (a reshape and its shape constant
each).
)doc");

template <typename T>
class FlatConcatOp : public OpKernel {
 public:
  explicit FlatConcatOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const int n = ctx->num_inputs();
    std::vector<int64_t> sizes(n), offsets(n, 0);
    std::vector<const T*> values(n);
    int64_t total = 0;
    for (int i = 0; i < n; ++i) {
      const Tensor& value = ctx->input(i);
      sizes[i] = value.NumElements();
      values[i] = value.flat<T>().data();
      offsets[i] = total;
      total += sizes[i];
    }
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, {total}, &out));
    T* const flat = out->flat<T>().data();
    ForEachRange(ctx, sizes, /*bytes_per_element=*/2 * sizeof(T),
                 [&](int i, int64_t begin, int64_t end) {
                   std::copy(values[i] + begin, values[i] + end,
                             flat + offsets[i] + begin);
                 });
  }
};

#define TF_ADAMW_REGISTER_FLAT_CONCAT(T)                              \
  REGISTER_KERNEL_BUILDER(Name("TfAdamwFlatConcat")                   \
                              .Device(::tensorflow::DEVICE_CPU)       \
                              .TypeConstraint<T>("T"),                \
                          FlatConcatOp<T>);
TF_ADAMW_REGISTER_FLAT_CONCAT(Eigen::half)
TF_ADAMW_REGISTER_FLAT_CONCAT(::tensorflow::bfloat16)
TF_ADAMW_REGISTER_FLAT_CONCAT(float)
TF_ADAMW_REGISTER_FLAT_CONCAT(double)
#undef TF_ADAMW_REGISTER_FLAT_CONCAT

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
                            .HostMemory("apply")
                            .HostMemory("accumulate")
                            .HostMemory("accumulation_steps"),
                        FusedApplyOp);

REGISTER_KERNEL_BUILDER(Name("TfAdamwAccumulatedMeans")
                            .Device(::tensorflow::DEVICE_CPU)
                            .HostMemory("accumulation_steps")
                            .HostMemory("compute"),
                        AccumulatedMeansOp);

REGISTER_KERNEL_BUILDER(
    Name("TfAdamwSlotTable").Device(::tensorflow::DEVICE_CPU), SlotTableOp);

}  // namespace
}  // namespace tf_adamw
