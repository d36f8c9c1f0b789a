// Precompiled header for all qforge libraries: the heavy libtorch headers and the std library.
// Sources still include what they use (narrow torch headers); this only makes that cheap.
#pragma once
#include <ATen/ATen.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/any.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/functional.h>
#include <torch/optim/adamw.h>
#include <torch/autograd.h>
#include <torch/serialize.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>
