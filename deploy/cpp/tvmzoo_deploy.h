// tvmzoo_deploy.h: read a tvmzoo module description (mod.json), refuse modules this host cannot run,
// decode and preprocess images exactly as tvmzoo's Python runner does, and format the five-line result.
// Header-only; needs OpenCV (imgcodecs, imgproc), OpenSSL's libcrypto (sha256) and tvm-ffi (JSON).
// Mirrors tvmzoo/run/runtime.py, tvmzoo/preprocess/, tvmzoo/io/images.py and tvmzoo/run/results.py.
#pragma once

#include <openssl/evp.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <tvm/ffi/extra/json.h>
#include <tvm/runtime/base.h>  // TVM_VERSION of the headers this runner is built with

#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace tvmzoo {

namespace fs = std::filesystem;
namespace json = tvm::ffi::json;

constexpr long kMaxPixels = 100000000;  // preprocess.MAX_PIXELS
constexpr int kTopK = 5;

// An error a user can fix: printed as one line, the program exits non-zero.
struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Preprocessing {
  int resize_w = 256, resize_h = 256, crop_w = 224, crop_h = 224;
  bool keep_aspect = false, has_crop_xy = false, rgb = true;
  int crop_x = 0, crop_y = 0;
  std::string interpolation = "BILINEAR_CV", norm = "DIV255_MINUSMEAN_DIVSTD";
  double mean[3] = {0.485, 0.456, 0.406}, std[3] = {0.229, 0.224, 0.225};
};

struct ModelMeta {
  std::vector<int64_t> shape;  // the input shape; shape[0] <= 0: any batch
  std::string dtype = "float32", mcpu, module_sha256, tvm_version;
  std::vector<std::string> cpu_features;
  int64_t amx_kernels = -1;  // kernels on AMX tiles; -1: a module from before mod.json said
  bool fused = false;
  Preprocessing pre;
};

inline std::string read_file(const fs::path& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Error("cannot read " + path.string());
  return std::string(std::istreambuf_iterator<char>(f), {});
}

// ---------------------------------------------------------------- mod.json

inline json::Object object_at(const json::Object& obj, const char* key, const std::string& where) {
  auto it = obj.find(key);
  auto value = it == obj.end() ? std::nullopt : (*it).second.try_cast<json::Object>();
  if (!value) throw Error(where + " is not a tvmzoo module description ('" + key + "' is missing); recompile it");
  return *value;
}

inline double number(const tvm::ffi::Any& v) {
  if (auto i = v.try_cast<int64_t>()) return static_cast<double>(*i);
  return v.cast<double>();
}

inline std::string text(const json::Object& obj, const char* key, const std::string& fallback = "") {
  auto it = obj.find(key);
  if (it == obj.end()) return fallback;
  auto s = (*it).second.try_cast<tvm::ffi::String>();
  return s ? std::string(*s) : fallback;
}

inline bool flag(const json::Object& obj, const char* key) {
  auto it = obj.find(key);
  return it != obj.end() && (*it).second.try_cast<bool>().value_or(false);
}

inline std::vector<double> numbers(const json::Object& obj, const char* key) {
  std::vector<double> out;
  auto it = obj.find(key);
  if (it == obj.end()) return out;
  if (auto arr = (*it).second.try_cast<json::Array>())
    for (const auto& v : *arr) out.push_back(number(v));
  return out;
}

inline Preprocessing read_preprocessing(const json::Object& p) {
  Preprocessing pre;
  auto resize = numbers(p, "resize"), crop = numbers(p, "crop"), xy = numbers(p, "crop_xy");
  auto mean = numbers(p, "mean"), std = numbers(p, "std");
  if (resize.size() != 2 || crop.size() != 2 || mean.size() != 3 || std.size() != 3)
    throw Error("mod.json: 'preprocessing' lacks resize / crop / mean / std; recompile the model");
  pre.resize_w = int(resize[0]), pre.resize_h = int(resize[1]), pre.crop_w = int(crop[0]), pre.crop_h = int(crop[1]);
  pre.has_crop_xy = xy.size() == 2;
  if (pre.has_crop_xy) pre.crop_x = int(xy[0]), pre.crop_y = int(xy[1]);
  pre.keep_aspect = flag(p, "keep_aspect"), pre.rgb = flag(p, "rgb");
  pre.interpolation = text(p, "interpolation", pre.interpolation);
  pre.norm = text(p, "norm", pre.norm);
  for (int c = 0; c < 3; ++c) pre.mean[c] = mean[c], pre.std[c] = std[c];
  return pre;
}

inline ModelMeta read_meta(const fs::path& dir) {
  fs::path path = dir / "mod.json";
  if (!fs::is_regular_file(path))
    throw Error("no compiled model at " + dir.string() + ": mod.json is missing. Run `vamc compile <yaml>` first");
  tvm::ffi::String problem;
  json::Value value = json::Parse(read_file(path), &problem);
  auto top = value.try_cast<json::Object>();
  if (!problem.empty() || !top) throw Error(path.string() + " is corrupt (" + std::string(problem) + "); recompile the model");
  ModelMeta meta;
  json::Object input = object_at(*top, "input", path.string());
  for (double d : numbers(input, "shape")) meta.shape.push_back(static_cast<int64_t>(d));
  if (meta.shape.size() != 4) throw Error(path.string() + ": 'input.shape' must be four integers; recompile");
  meta.dtype = text(input, "dtype", "float32");
  meta.mcpu = text(object_at(*top, "target", path.string()), "mcpu");
  meta.module_sha256 = text(*top, "module_sha256");
  meta.tvm_version = text(*top, "tvm_version");
  meta.fused = text(*top, "preprocess") == "fused";
  if (auto it = top->find("cpu_features"); it != top->end())
    for (const auto& v : (*it).second.cast<json::Array>()) meta.cpu_features.push_back(std::string(v.cast<tvm::ffi::String>()));
  if (auto it = top->find("amx_kernels"); it != top->end()) meta.amx_kernels = static_cast<int64_t>(number((*it).second));
  meta.pre = read_preprocessing(object_at(*top, "preprocessing", path.string()));
  return meta;
}

// ---------------------------------------------------------------- refusing modules (run/runtime.py)

// A /proc/cpuinfo flag as LLVM spells it, where they differ (run/host.py _KERNEL_TO_LLVM): mod.json records
// LLVM's names (older builds: cpuinfo's); both sides are compared in LLVM's.
inline std::string llvm_name(const std::string& flag) {
  static const std::map<std::string, std::string> names{
      {"sse4_1", "sse4.1"}, {"sse4_2", "sse4.2"}, {"pni", "sse3"}, {"abm", "lzcnt"}, {"bmi1", "bmi"}, {"sha_ni", "sha"},
      {"pclmulqdq", "pclmul"}, {"avx512_vnni", "avx512vnni"}, {"avx512_vbmi2", "avx512vbmi2"},
      {"avx512_bitalg", "avx512bitalg"}, {"avx512_vpopcntdq", "avx512vpopcntdq"}, {"avx512_bf16", "avx512bf16"},
      {"avx512_fp16", "avx512fp16"}, {"avx512_vp2intersect", "avx512vp2intersect"}, {"avx_vnni", "avxvnni"},
      {"avx_ifma", "avxifma"}, {"avx_vnni_int8", "avxvnniint8"}, {"avx_ne_convert", "avxneconvert"},
      {"amx_tile", "amx-tile"}, {"amx_int8", "amx-int8"}, {"amx_bf16", "amx-bf16"}, {"amx_fp16", "amx-fp16"}};
  auto it = names.find(flag);
  return it == names.end() ? flag : it->second;
}

inline std::set<std::string> host_cpu_flags() {  // in LLVM's names
  std::ifstream f("/proc/cpuinfo");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind("flags", 0) != 0) continue;
    std::istringstream words(line.substr(line.find(':') + 1));
    std::set<std::string> flags;
    for (std::string w; words >> w;) flags.insert(llvm_name(w));
    return flags;
  }
  return {};
}

inline void check_cpu(const ModelMeta& meta, const fs::path& dir) {
  auto flags = host_cpu_flags();
  if (flags.empty()) return;  // unknown host: as the Python loader, do not refuse
  std::string missing;
  for (const auto& f : meta.cpu_features)
    if (!flags.count(llvm_name(f))) missing += (missing.empty() ? "" : ", ") + llvm_name(f);
  if (!missing.empty())
    throw Error(dir.string() + " was built for " + meta.mcpu + " and needs CPU features this host lacks (" + missing +
                "); running it would crash with an illegal instruction. Recompile it for this CPU");
}

// AMX: a Linux process must ask for the tile data state before its first tile instruction (else SIGILL);
// tvmzoo/run/host.py request_amx. Asked when mod.json's features include AMX; false where refused.
inline bool request_amx(const ModelMeta& meta) {
  bool amx = std::any_of(meta.cpu_features.begin(), meta.cpu_features.end(),
                         [](const std::string& f) { return f.rfind("amx", 0) == 0; });
#if defined(__linux__) && defined(__x86_64__)
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  if (amx && host_cpu_flags().count("amx-tile"))
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#endif
  return false;
}

// A module with kernels on AMX tiles is refused where the tile state is denied (run/runtime.py check_amx).
inline void check_amx(const ModelMeta& meta, const fs::path& dir) {
  if (request_amx(meta) || meta.amx_kernels <= 0) return;
  throw Error(dir.string() + " runs " + std::to_string(meta.amx_kernels) + " kernels on AMX tiles, but Linux refused "
              "this process the AMX tile state; its first tile instruction would crash. Run it where AMX is allowed, "
              "or recompile without AMX: backend.target: {kind: llvm, mcpu: " + meta.mcpu +
              ", mattr: [-amx-tile, -amx-int8, -amx-bf16]}");
}

// A module runs on the TVM runtime it was built with: 0.27.0.post1 on the 0.27.0 runtime, not on 0.28.
inline void check_tvm_version(const ModelMeta& meta, const fs::path& dir) {
  const std::string runtime = TVM_VERSION;
  if (meta.tvm_version.compare(0, runtime.size(), runtime) != 0)
    throw Error(dir.string() + " was built with TVM " + meta.tvm_version + " but this runner uses the TVM " + runtime +
                " runtime; recompile the model, or rebuild the runner against that TVM");
}

inline std::string sha256_hex(const fs::path& path) {
  std::string data = read_file(path);
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int size = 0;
  EVP_Digest(data.data(), data.size(), digest, &size, EVP_sha256(), nullptr);
  char hex[2 * EVP_MAX_MD_SIZE + 1];
  for (unsigned int i = 0; i < size; ++i) std::snprintf(hex + 2 * i, 3, "%02x", digest[i]);
  return std::string(hex, 2 * size);
}

inline void check_module_file(const ModelMeta& meta, const fs::path& so) {
  if (!fs::is_regular_file(so)) throw Error(so.string() + " is missing; recompile the model with `vamc compile`");
  if (!meta.module_sha256.empty() && sha256_hex(so) != meta.module_sha256)
    throw Error(so.string() + " does not match mod.json (checksum differs): the file is corrupt, truncated or from "
                "another build; recompile with `vamc compile`");
}

// ---------------------------------------------------------------- decoding (preprocess.read_image)

inline bool known_image(const std::string& b) {
  return b.rfind("\xff\xd8", 0) == 0 || b.rfind("\x89PNG", 0) == 0 || b.rfind("BM", 0) == 0 ||
         (b.rfind("RIFF", 0) == 0 && b.size() > 12 && b.compare(8, 4, "WEBP") == 0);
}

inline cv::Mat read_image(const fs::path& path) {
  std::string bytes;
  try {
    bytes = read_file(path);
  } catch (const Error&) {
    throw Error("cannot decode " + path.string() + ": cannot read it");
  }
  if (bytes.empty()) throw Error("cannot decode " + path.string() + ": the file is empty (0 bytes); re-copy or remove it");
  if (!known_image(bytes)) throw Error("cannot decode " + path.string() + ": not a supported image (JPEG, PNG, BMP, WebP)");
  cv::Mat image = cv::imdecode(cv::Mat(1, int(bytes.size()), CV_8U, bytes.data()), cv::IMREAD_COLOR);
  if (image.empty()) throw Error("cannot decode " + path.string() + ": not a supported image or corrupt/truncated data");
  size_t sos = bytes.rfind("\xff\xda");
  if (bytes[0] == '\xff' && (sos == std::string::npos || bytes.find("\xff\xd9", sos) == std::string::npos))
    throw Error("cannot decode " + path.string() + ": truncated JPEG (no end-of-image marker); re-copy the file");
  if (long(image.rows) * image.cols > kMaxPixels)
    throw Error("cannot decode " + path.string() + ": above the limit of 100000000 pixels; downscale it first");
  return image;
}

// ---------------------------------------------------------------- resizing

// numpy's pairwise summation of float64 (what ndarray.sum() computes), so that weights round the same.
inline double pairwise_sum(const double* a, size_t n) {
  if (n < 8) {
    double s = 0.;
    for (size_t i = 0; i < n; ++i) s += a[i];
    return s;
  }
  if (n <= 128) {
    double r[8];
    for (int j = 0; j < 8; ++j) r[j] = a[j];
    size_t i = 8;
    for (; i < n - n % 8; i += 8)
      for (int j = 0; j < 8; ++j) r[j] += a[i + j];
    double s = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
    for (; i < n; ++i) s += a[i];
    return s;
  }
  size_t half = n / 2;
  half -= half % 8;
  return pairwise_sum(a, half) + pairwise_sum(a + half, n - half);
}

// Pillow's bilinear (antialiased triangle filter, 22-bit fixed point), one axis: preprocess.resize_pillow.
inline cv::Mat pillow_pass(const cv::Mat& in, int out_size, bool horizontal) {
  const int in_size = horizontal ? in.cols : in.rows, bits = 22;
  const double scale = double(in_size) / out_size, filterscale = std::max(scale, 1.0), support = filterscale;
  const int taps = int(std::ceil(support)) * 2 + 1;
  std::vector<int> first(out_size), count(out_size);
  std::vector<int64_t> weight(size_t(out_size) * taps, 0);
  std::vector<double> w(taps);
  for (int xx = 0; xx < out_size; ++xx) {
    double center = (xx + 0.5) * scale;
    int xmin = std::max(int(center - support + 0.5), 0);
    int xmax = std::min(int(center + support + 0.5), in_size) - xmin;
    for (int x = 0; x < xmax; ++x) w[x] = std::max(0.0, 1.0 - std::fabs((double(x + xmin) - center + 0.5) / filterscale));
    double total = pairwise_sum(w.data(), size_t(xmax));
    for (int x = 0; x < xmax; ++x)
      weight[size_t(xx) * taps + x] = int64_t(std::trunc(0.5 + (total != 0.0 ? w[x] / total : w[x]) * (1 << bits)));
    first[xx] = xmin, count[xx] = xmax;
  }
  cv::Mat out(horizontal ? in.rows : out_size, horizontal ? out_size : in.cols, CV_8UC3);
  for (int r = 0; r < out.rows; ++r)
    for (int c = 0; c < out.cols; ++c) {
      int o = horizontal ? c : r;
      for (int ch = 0; ch < 3; ++ch) {
        int64_t acc = int64_t(1) << (bits - 1);
        for (int k = 0; k < count[o]; ++k) {
          int src = first[o] + k;
          acc += int64_t(horizontal ? in.at<cv::Vec3b>(r, src)[ch] : in.at<cv::Vec3b>(src, c)[ch]) * weight[size_t(o) * taps + k];
        }
        out.at<cv::Vec3b>(r, c)[ch] = uint8_t(std::clamp<int64_t>(acc >> bits, 0, 255));
      }
    }
  return out;
}

inline cv::Mat resize(const cv::Mat& image, int w, int h, const std::string& interpolation) {
  if (image.cols == w && image.rows == h) return image;
  if (interpolation == "BILINEAR_PILLOW") {
    cv::Mat out = image;
    if (w != out.cols) out = pillow_pass(out, w, true);
    if (h != out.rows) out = pillow_pass(out, h, false);
    return out;
  }
  int mode = interpolation == "NEAREST" ? cv::INTER_NEAREST : interpolation == "BICUBIC" ? cv::INTER_CUBIC : cv::INTER_LINEAR;
  cv::Mat out;
  cv::resize(image, out, cv::Size(w, h), 0, 0, mode);
  return out;
}

inline cv::Size resized_size(const Preprocessing& pre, int width, int height) {
  if (!pre.keep_aspect) return {pre.resize_w, pre.resize_h};
  int64_t s = pre.resize_w;
  if (width <= height) return {int(s), int(double(s * height) / width)};
  return {int(double(s * width) / height), int(s)};
}

inline cv::Mat resized(const Preprocessing& pre, const cv::Mat& bgr, cv::Point* crop_at) {
  cv::Size size = resized_size(pre, bgr.cols, bgr.rows);
  if (long(size.width) * size.height > kMaxPixels) throw Error("the image resized to keep its aspect ratio is too large; crop it first");
  *crop_at = pre.has_crop_xy ? cv::Point(pre.crop_x, pre.crop_y)
                             : cv::Point((size.width - pre.crop_w) / 2, (size.height - pre.crop_h) / 2);
  return resize(bgr, size.width, size.height, pre.interpolation);
}

// ---------------------------------------------------------------- the network's input

// Per-channel (scale, offset) as float32: normalized = value * scale + offset (Preprocessing.scale_offset).
inline void scale_offset(const Preprocessing& p, float scale[3], float offset[3]) {
  for (int c = 0; c < 3; ++c) {
    double s = 1.0, o = 0.0;
    if (p.norm == "MINUSMEAN_DIVSTD") s = 1 / p.std[c], o = -p.mean[c] / p.std[c];
    else if (p.norm == "DIV255_MINUSMEAN_DIVSTD") s = 1 / (255 * p.std[c]), o = -p.mean[c] / p.std[c];
    else if (p.norm == "DIV127_5_MINUSONE") s = 1 / 127.5, o = -1.0;
    else if (p.norm == "DIV255") s = 1.0 / 255;
    scale[c] = float(s), offset[c] = float(o);
  }
}

// Host preprocessing: 3xHxW float32 (preprocess.apply), written to `out`.
inline void to_tensor(const Preprocessing& pre, const cv::Mat& bgr, float* out) {
  cv::Point at;
  cv::Mat img = resized(pre, bgr, &at);
  float scale[3], offset[3];
  scale_offset(pre, scale, offset);
  const size_t plane = size_t(pre.crop_w) * pre.crop_h;
  for (int y = 0; y < pre.crop_h; ++y)
    for (int x = 0; x < pre.crop_w; ++x) {
      const cv::Vec3b& px = img.at<cv::Vec3b>(at.y + y, at.x + x);
      for (int c = 0; c < 3; ++c) {
        float v = float(px[pre.rgb ? 2 - c : c]) * scale[c];  // two roundings, as numpy (built without FMA)
        out[c * plane + size_t(y) * pre.crop_w + x] = v + offset[c];
      }
    }
}

// A fused module's input: the resized uint8 BGR HxWx3 image or window (preprocess/fused.py: fused_input).
inline void to_fused(const Preprocessing& pre, const cv::Mat& bgr, uint8_t* out, int width, int height) {
  cv::Point at;
  cv::Mat img = resized(pre, bgr, &at);
  if (pre.keep_aspect) {
    int mx = pre.has_crop_xy ? pre.crop_x : (width - pre.crop_w) / 2;
    int my = pre.has_crop_xy ? pre.crop_y : (height - pre.crop_h) / 2;
    img = img(cv::Rect(at.x - mx, at.y - my, width, height));
  }
  for (int y = 0; y < height; ++y) std::memcpy(out + size_t(y) * width * 3, img.ptr<uint8_t>(y), size_t(width) * 3);
}

// ---------------------------------------------------------------- labels and results (io/images.py, run/results.py)

// One class name per line, or `<wnid>\t<names>` lines (imagenet_synsets.txt).
inline std::vector<std::string> read_labels(const fs::path& path) {
  std::string content;
  try {
    content = read_file(path);
  } catch (const Error&) {
    throw Error("label file " + path.string() + " cannot be read: check --label_txt");
  }
  if (content.find_first_not_of(" \t\r\n") != std::string::npos && content[content.find_first_not_of(" \t\r\n")] == '{')
    throw Error("label file " + path.string() + " is a dict literal; the C++ runner reads one name per line (imagenet.txt)");
  std::vector<std::string> lines;
  std::istringstream in(content);
  for (std::string line; std::getline(in, line);) lines.push_back(line.empty() || line.back() != '\r' ? line : line.substr(0, line.size() - 1));
  while (!lines.empty() && lines.back().find_first_not_of(" \t") == std::string::npos) lines.pop_back();
  if (lines.empty()) throw Error("label file " + path.string() + " is empty: it needs one class name per line");
  auto wnid_line = [](const std::string& l) {
    size_t tab = l.find('\t');
    return tab == 9 && l[0] == 'n' && std::all_of(l.begin() + 1, l.begin() + 9, ::isdigit);
  };
  if (std::all_of(lines.begin(), lines.end(), wnid_line))
    for (auto& l : lines) l = l.substr(10);
  return lines;
}

inline std::vector<double> probabilities(const float* x, size_t n) {
  std::vector<double> p(x, x + n);
  double sum = pairwise_sum(p.data(), n);
  bool probs = std::all_of(p.begin(), p.end(), [](double v) { return v >= 0; }) && std::fabs(float(sum) - 1.0) <= 1e-3 + 1e-5;
  if (probs) return p;
  double top = *std::max_element(p.begin(), p.end());
  for (double& v : p) v = std::exp(v - top);
  double total = pairwise_sum(p.data(), n);
  for (double& v : p) v /= total;
  return p;
}

inline std::string result_lines(const std::string& path, const float* out, size_t n, const std::vector<std::string>& names) {
  std::vector<double> p = probabilities(out, n);
  std::vector<size_t> order(n);
  for (size_t i = 0; i < n; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return p[a] > p[b]; });
  std::string lines;
  char prob[64];
  for (int rank = 0; rank < kTopK && size_t(rank) < n; ++rank) {
    size_t idx = order[rank];
    std::snprintf(prob, sizeof prob, "%.8f", p[idx]);
    lines += path + ": Relay top-" + std::to_string(rank) + " id: " + std::to_string(idx) + ", prob: " + prob +
             ", class name: " + (idx < names.size() ? names[idx] : std::to_string(idx)) + "\n";
  }
  return lines;
}

}  // namespace tvmzoo
