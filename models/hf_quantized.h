// Quantized Hugging Face checkpoints read back to float: the per-linear packed tensors of GPTQ
// (optimum + gptqmodel: qweight/qzeros/scales/g_idx), AWQ GEMM (AutoAWQ's WQLinear_GEMM:
// qweight/qzeros/scales) and compressed-tensors (pack-quantized weight_packed/weight_scale/
// weight_zero_point/weight_shape, int-quantized int8 weight/weight_scale, float-quantized fp8 e4m3
// weight/weight_scale per tensor, channel or block, with input_scale / input_zero_point of static
// activations read and left unused), bitsandbytes 4-bit
// (transformers' load_in_4bit save: uint8 weight + absmax/quant_map/nested_* + a JSON quant_state;
// NF4 and FP4, double quant or not; the NF4 bytes also handed out packed), bitsandbytes 8-bit
// (transformers' load_in_8bit save: int8 `weight` = Int8Params' CB [out, in], fp32 `SCB` [out], uint8
// `weight_format` 0 = row-major; handed out as they are to a streamer's build_packed for peft.base
// int8), and the int32 word
// packings these formats share with qforge's writers (export/int_export, export/awq_export).
// Invariants:
//  - check_quantized_linear reads only headers (dtypes, shapes) and names the file, the tensor and
//    the rule for every problem; dequantize_linear then checks the data rules (g_idx range,
//    weight_shape) before computing anything;
//  - dequantize_linear computes exactly what the peer's own dequantization computes, in float32:
//    GPTQ scales[g_idx] * (q - z[g_idx]) with v1 zero points converted as gptqmodel does (each
//    int32 word + 0x55555555 / 0x11111111 / 0x01010101, 3-bit words + gptqmodel's constant per word
//    position, carries included); AWQ (q - z) * s per group in AutoAWQ's
//    nibble order; compressed-tensors (q - zp) * s with its signed codes, fp8 weight.to(scale dtype) *
//    scale in the scale's dtype (block scales repeated over their tiles); bitsandbytes 4-bit
//    dequantize_4bit (code[q] * absmax in fp32, the absmax first decoded as code2[a] * nested_absmax
//    + offset when double-quantized, then cast to the quant_state dtype) read back as float32;
//    bitsandbytes 8-bit int8_vectorwise_dequant (CB * SCB[row] * 7.874015718698502e-3 in fp32);
//  - pack_* and unpack_* are exact inverses on codes in [0, 2^bits).
// Bits that do not divide 32 (GPTQ int3) pack as one bit stream: code k of each run of 32 codes at bit
// 3k of 3 consecutive words (gptqmodel's PackableQuantLinear.pack).
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
// bits bits*k, low first (GPTQ qweight/qzeros, compressed-tensors pack_to_int32); for bits 3 (cols a
// multiple of 32) code k of each 32 at bit 3k of the 96-bit little-endian run of 3 words.
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

// bitsandbytes 4-bit (transformers' save of a load_in_4bit model), per linear L: L.weight uint8
// [ceil(out*in/2), 1] (element 2i in the high nibble of byte i, row-major), L.weight.absmax,
// L.weight.quant_map [16], with double quant L.weight.nested_absmax / nested_quant_map [256], and
// L.weight.quant_state.bitsandbytes__<nf4|fp4>: a uint8 tensor holding the JSON of the rest
// (quant_type, blocksize, dtype, shape, nested_blocksize, nested_offset). Parts are named "weight",
// "absmax", "quant_map", "nested_absmax", "nested_quant_map" and "quant_state".
// The parsed quant_state of one linear (check_quantized_data has checked it against the tensors).
struct BnbQuantState {
  std::string quant_type;        // nf4 | fp4
  int64_t blocksize = 64;
  std::string dtype;             // float32 | bfloat16 | float16: what dequantize_4bit returns
  bool nested = false;
  int64_t nested_blocksize = 0;
  float nested_offset = 0.f;     // bitsandbytes: torch.tensor(float(nested_offset)), fp32
};
BnbQuantState bnb_quant_state(const std::string& linear, const QuantizedParts& parts,
                              const std::map<std::string, at::Tensor>& tensors, int64_t out, int64_t in);

// A bitsandbytes NF4 linear's packed state as it is in the file (copied out of the mapping), for a
// frozen base that keeps the bytes (peft: quant::Nf4Linear) instead of re-quantizing.
struct PackedNf4 {
  at::Tensor packed;         // uint8 [ceil(out*in/2)]
  at::Tensor absmax;         // uint8 codes [n_blocks] (nested) or fp32 [n_blocks]
  at::Tensor nested_absmax;  // fp32 (nested only)
  at::Tensor nested_code;    // fp32 [256]: the stored nested_quant_map (nested only)
  float offset = 0.f;
  int64_t blocksize = 64, nested_blocksize = 256;
  bool nested = false;
  std::vector<int64_t> shape;  // [out, in]
};
// The packed NF4 state of a bitsandbytes nf4 linear whose dequantization computed in `model_dtype`
// equals bitsandbytes' (quant_state dtype float32, or the model dtype itself); false otherwise
// (fp4, or an fp16/bf16 quant_state under a wider model: bitsandbytes rounds there first).
bool bnb_packed_nf4(const HfQuant& q, const std::string& linear, int64_t out, int64_t in, const QuantizedParts& parts,
                    const std::map<std::string, at::Tensor>& tensors, at::ScalarType model_dtype, PackedNf4& pk);

// A GPTQ / AWQ / compressed-tensors int linear [out, in] in one packed layout whatever the file's (GPTQ
// gptq_v2's, plus an explicit g_idx): qweight int32 [ceil(in*bits/32), out] holds the unsigned codes u in
// [0, 2^bits) along the input (code k of a word at bits*k, low first); qzeros int32 [groups,
// ceil(out*bits/32)] the integer zero points z along the output; scales [groups, out] in the file's float
// dtype; g_idx int32 [in] each input column's group. weight = (u - z[g]) * scales[g] in float32, equal
// to dequantize_linear of the file's parts (v1 zero points converted as gptqmodel does; AWQ's nibble
// order undone; compressed-tensors' signed codes and zero points offset by 2^(bits-1)). Bit widths
// dividing 32 (2, 4, 8). The parts must have passed check_quantized_linear / check_quantized_data.
struct PackedInt {
  int bits = 4;
  at::Tensor qweight, qzeros, scales, g_idx;
  // g_idx is i / group_size for every column (contiguous groups that tile the input): dequantization
  // broadcasts the group's zero point and scale instead of gathering them per column. 0: any g_idx.
  int64_t group_size = 0;
};
// The group_size field for p's g_idx over `in` columns (0 unless g_idx == arange(in) / (in / groups)).
int64_t contiguous_group_size(const PackedInt& p, int64_t in);
PackedInt packed_int(const HfQuant& q, const std::string& linear, int64_t out, int64_t in,
                     const std::map<std::string, at::Tensor>& tensors);
// Its float32 weight [out, in] on the tensors' device: on the CPU one parallel loop over blocks of
// output rows (each word read once, zero points and scales decoded once per group); elsewhere
// dequantize_packed_int_aten. Both equal dequantize_linear bit for bit.
at::Tensor dequantize_packed_int(const PackedInt& p, int64_t out, int64_t in);
// The same with ATen ops on the tensors' device (int32 shifts and masks; contiguous groups broadcast,
// an arbitrary g_idx gathered per column): what a GPU runs.
at::Tensor dequantize_packed_int_aten(const PackedInt& p, int64_t out, int64_t in);

// What one linear is stored as ("gptq int4 group 32 sym, act-order g_idx"), for `qforge inspect`.
std::string describe_quantized_linear(const HfQuant& q, const std::string& linear, const QuantizedParts& parts);

}  // namespace qf::models
