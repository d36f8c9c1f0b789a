// Quantized Hugging Face checkpoints read back to float: the per-linear packed tensors of GPTQ
// (optimum + gptqmodel: qweight/qzeros/scales/g_idx), AWQ GEMM (AutoAWQ's WQLinear_GEMM:
// qweight/qzeros/scales) and compressed-tensors (pack-quantized weight_packed/weight_scale/
// weight_zero_point/weight_shape, int-quantized int8 weight/weight_scale), and the int32 word
// packings these formats share with qforge's writers (export/int_export, export/awq_export).
// Invariants:
//  - check_quantized_linear reads only headers (dtypes, shapes) and names the file, the tensor and
//    the rule for every problem; dequantize_linear then checks the data rules (g_idx range,
//    weight_shape) before computing anything;
//  - dequantize_linear computes exactly what the peer's own dequantization computes, in float32:
//    GPTQ scales[g_idx] * (q - z[g_idx]) with v1 zero points converted as gptqmodel does (each
//    int32 word + 0x11111111 / 0x01010101, carries included); AWQ (q - z) * s per group in AutoAWQ's
//    nibble order; compressed-tensors (q - zp) * s with its signed codes;
//  - pack_* and unpack_* are exact inverses on codes in [0, 2^bits).
#pragma once
#include <ATen/core/Tensor.h>

#include <map>
#include <string>
#include <vector>

#include "core/safetensors_header.h"
#include "models/hf_config.h"

namespace qf::models {

namespace packed {
// Codes u [rows, cols] (each in [0, 2^bits)) -> int32 [rows, cols*bits/32]: element k of a word at
// bits bits*k, low first (GPTQ qweight/qzeros, compressed-tensors pack_to_int32).
at::Tensor pack_cols(const at::Tensor& u, int bits);
at::Tensor unpack_cols(const at::Tensor& words, int bits);  // the inverse, int64 [rows, words*32/bits]
// AutoAWQ's nibble order (awq/utils/packing_utils.py AWQ_ORDER): nibble i of a word holds column
// 8c + {0, 2, 4, 6, 1, 3, 5, 7}[i]. u [rows, cols] in [0, 16) -> int32 [rows, cols/8].
at::Tensor pack_awq(const at::Tensor& u);
at::Tensor unpack_awq(const at::Tensor& words);  // the inverse (unpack_awq + reverse_awq_order), int64
}  // namespace packed

// Where a quantized linear's part lives: the file and its header entry.
struct QuantizedPart {
  std::string file;  // path, for errors
  st::Entry entry;
};
using QuantizedParts = std::map<std::string, QuantizedPart>;  // part ("qweight", ...) -> where

// The part name of tensor `name` if it is a packed part of a quantized linear in this format
// ("qweight" for "model.layers.0.mlp.up_proj.qweight"), else "". `dtype` tells compressed-tensors'
// int8 "weight" from a float one. `linear` gets the linear's name.
std::string quantized_part(const HfQuant& q, const std::string& name, st::DType dtype, std::string& linear);

// Header checks of one linear [out, in]: every problem (missing part, dtype, shape against in/out
// and the group size), each naming file, tensor and rule. Empty: the parts are consistent.
std::vector<std::string> check_quantized_linear(const HfQuant& q, const std::string& linear, int64_t out, int64_t in,
                                                const QuantizedParts& parts);

// The data rules alone (g_idx in [0, groups), weight_shape == [out, in]) on the parts in `tensors`
// (only g_idx / weight_g_idx / weight_shape need be there): InputError naming file and tensor.
void check_quantized_data(const HfQuant& q, const std::string& linear, int64_t out, int64_t in,
                          const QuantizedParts& parts, const std::map<std::string, at::Tensor>& tensors);

// The float32 weight [out, in] the parts decode to. `tensors` maps part -> the loaded tensor.
// Data rules (g_idx in [0, groups), weight_shape == [out, in]) throw InputError naming file and tensor.
at::Tensor dequantize_linear(const HfQuant& q, const std::string& linear, int64_t out, int64_t in,
                             const QuantizedParts& parts, const std::map<std::string, at::Tensor>& tensors);

// What one linear is stored as ("gptq int4 group 32 sym, act-order g_idx"), for `qforge inspect`.
std::string describe_quantized_linear(const HfQuant& q, const std::string& linear, const QuantizedParts& parts);

}  // namespace qf::models
