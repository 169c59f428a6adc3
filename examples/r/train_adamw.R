#!/usr/bin/env Rscript
# tf_adamw from R, through reticulate: a small Keras regression model,
# compiled with tf_adamw.keras.AdamW using the argument names of R's
# optimizer_adam_w() (keras3 package), trained with fit(), saved as .keras and
# loaded back.
#
# Usage (from the repository root; `make r-example` does this):
#   RETICULATE_PYTHON=.venv-r/bin/python \
#     Rscript examples/r/train_adamw.R OUTPUT_DIR [--mirrored]
#
# OUTPUT_DIR receives model.keras. --mirrored also trains the same model under
# a MirroredStrategy over 2 logical CPUs (saved as model_mirrored.keras).
# RETICULATE_PYTHON must name a Python with tf_adamw installed and numpy < 2
# (Debian's reticulate 1.28 refuses NumPy 2): see examples/r/README.md.
#
# Only reticulate is needed (not the keras3 R package). Any failed check stops
# the script with an error, so its exit status says whether everything worked.

args <- commandArgs(trailingOnly = TRUE)
mirrored <- "--mirrored" %in% args
args <- setdiff(args, "--mirrored")
if (length(args) != 1) {
  stop("usage: Rscript train_adamw.R OUTPUT_DIR [--mirrored]", call. = FALSE)
}
dir.create(args[[1]], recursive = TRUE, showWarnings = FALSE)
out_dir <- normalizePath(args[[1]], mustWork = TRUE)

# Quieter TensorFlow; must be set before Python imports it.
Sys.setenv(TF_CPP_MIN_LOG_LEVEL = "2")
suppressPackageStartupMessages(library(reticulate))

np <- import("numpy", convert = FALSE)
tf <- import("tensorflow")
keras <- import("keras")
tf_adamw <- import("tf_adamw")

if (mirrored) {
  # Two logical CPUs, configured before TensorFlow creates its devices.
  cpus <- tf$config$list_physical_devices("CPU")
  tf$config$set_logical_device_configuration(
    cpus[[1]],
    list(tf$config$LogicalDeviceConfiguration(),
         tf$config$LogicalDeviceConfiguration()))
}

cat(sprintf("R %s, reticulate %s; Python %s, numpy %s, TensorFlow %s, Keras %s\n",
            getRversion(), packageVersion("reticulate"),
            py_config()$version, py_to_r(np$`__version__`),
            tf$`__version__`, keras$`__version__`))

# Synthetic regression data, generated in R with a fixed seed.
set.seed(20240611)
n <- 2048
d <- 8L
x <- matrix(rnorm(n * d), nrow = n, ncol = d)
w <- rnorm(d)
y <- matrix(x %*% w + 0.1 * rnorm(n), ncol = 1)
x_py <- np$asarray(x, dtype = "float32")
y_py <- np$asarray(y, dtype = "float32")

keras$utils$set_random_seed(1L)

build_model <- function() {
  # Keras's own arguments (units, shapes) want R integers: 16L, not 16.
  model <- keras$Sequential(list(
    keras$Input(shape = list(d)),
    keras$layers$Dense(16L, activation = "relu"),
    keras$layers$Dense(1L)
  ))
  # optimizer_adam_w()'s argument names, every number an R double:
  # ema_overwrite_frequency = 100 and gradient_accumulation_steps = 4 reach
  # Python as 100.0 and 4.0 and are taken as ints; NULL is None.
  optimizer <- tf_adamw$keras$AdamW(
    learning_rate = 1e-3,
    weight_decay = 0.004,
    beta_1 = 0.9,
    beta_2 = 0.999,
    epsilon = 1e-07,
    amsgrad = FALSE,
    clipnorm = NULL,
    clipvalue = NULL,
    global_clipnorm = NULL,
    use_ema = TRUE,
    ema_momentum = 0.99,
    ema_overwrite_frequency = 100,
    name = "adamw",
    loss_scale_factor = NULL,
    gradient_accumulation_steps = 4
  )
  model$compile(optimizer = optimizer, loss = "mse")
  model
}

train <- function(label, file, strategy = NULL) {
  if (is.null(strategy)) {
    model <- build_model()
  } else {
    with(strategy$scope(), model <- build_model())
  }
  optimizer <- model$optimizer
  config <- optimizer$get_config()
  for (key in c("gradient_accumulation_steps", "ema_overwrite_frequency")) {
    # An R integer here means Python gave back an int, not 4.0 / 100.0.
    if (!is.integer(config[[key]])) {
      stop(sprintf("%s: get_config()$%s is not an integer: %s", label, key,
                   format(config[[key]])), call. = FALSE)
    }
  }

  history <- model$fit(x_py, y_py, batch_size = 16L, epochs = 8L,
                       shuffle = TRUE, verbose = 0L)
  losses <- unlist(history$history$loss)
  first <- losses[[1]]
  last <- losses[[length(losses)]]
  if (!all(is.finite(losses)) || !(last < first)) {
    stop(sprintf("%s: the loss did not go down: %s", label,
                 paste(format(losses), collapse = ", ")), call. = FALSE)
  }
  iterations <- as.integer(optimizer$iterations$numpy())
  # 2048 / 16 = 128 batches per epoch, 4 per applied update: 32 per epoch.
  expected <- as.integer(8 * (n / 16) / 4)
  if (iterations != expected) {
    stop(sprintf("%s: %d applied updates, expected %d", label, iterations,
                 expected), call. = FALSE)
  }
  evaluated <- model$evaluate(x_py, y_py, batch_size = 256L, verbose = 0L)

  path <- file.path(out_dir, file)
  model$save(path)
  if (!file.exists(path)) stop(sprintf("%s: %s not written", label, path))

  reloaded <- keras$models$load_model(path)
  reloaded_iterations <- as.integer(reloaded$optimizer$iterations$numpy())
  if (reloaded_iterations != iterations) {
    stop(sprintf("%s: iterations came back as %d, not %d", label,
                 reloaded_iterations, iterations), call. = FALSE)
  }
  if (!inherits(reloaded$optimizer, "tf_adamw.keras.optimizer.AdamW")) {
    stop(sprintf("%s: reloaded optimizer is %s", label,
                 class(reloaded$optimizer)[[1]]), call. = FALSE)
  }
  reevaluated <- reloaded$evaluate(x_py, y_py, batch_size = 256L,
                                   verbose = 0L)
  if (abs(reevaluated - evaluated) > 1e-5 * max(1, abs(evaluated))) {
    stop(sprintf("%s: reloaded model's loss %.6f differs from %.6f", label,
                 reevaluated, evaluated), call. = FALSE)
  }

  cat(sprintf("[%s] replicas: %d\n", label,
              if (is.null(strategy)) 1L else strategy$num_replicas_in_sync))
  cat(sprintf("[%s] loss: first epoch %.6f -> last epoch %.6f (decreased)\n",
              label, first, last))
  cat(sprintf("[%s] iterations: %d (after reload: %d)\n", label, iterations,
              reloaded_iterations))
  cat(sprintf("[%s] saved: %s\n", label, path))
}

cat(paste0("optimizer arguments from R: gradient_accumulation_steps = 4, ",
           "ema_overwrite_frequency = 100 (doubles), clipnorm = NULL\n"))
train("one device", "model.keras")
if (mirrored) {
  strategy <- tf$distribute$MirroredStrategy(list("/cpu:0", "/cpu:1"))
  train("mirrored", "model_mirrored.keras", strategy)
}
cat("OK\n")
