// tvmzoo_classify: the runstream classification job (common/vsx/classification.py) without Python.
// Loads <workspace>/<name>/mod.so with TVM's C++ runtime after the checks tvmzoo's loader makes, runs
// the Relax VM on each image preprocessed as mod.json says and writes the five-line result file.
// --repeat N instead times N forward passes on the first image (vamp's model latency).
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/container/tensor.h>

#include <chrono>
#include <cstring>
#include <iostream>
#include <map>

#include "tvmzoo_deploy.h"

namespace fs = std::filesystem;
namespace ffi = tvm::ffi;
using tvmzoo::Error;

namespace {

constexpr int kPooledAllocator = 2;  // tvm.runtime.vm.VirtualMachine.POOLED_ALLOCATOR

struct AlignedAlloc {  // 64-byte aligned host memory for the input tensor (the VM reads it in place)
  void AllocData(DLTensor* t) { t->data = std::aligned_alloc(64, (ffi::GetDataSize(*t) + 63) / 64 * 64); }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

struct Args {
  std::map<std::string, std::string> values{{"save_dir", "./runstream_output"}, {"save_result_txt", "result.txt"}};
  int repeat = 0;
};

Args parse(int argc, char** argv) {
  static const std::set<std::string> known{"file_path", "model_prefix_path", "label_txt", "save_dir", "save_result_txt",
                                           "device_id", "infer_mode", "repeat"};
  Args args;
  for (int i = 1; i < argc; ++i) {
    std::string key = argv[i];
    if (key.rfind("--", 0) != 0 || !known.count(key.substr(2)) || i + 1 >= argc)
      throw Error("usage: tvmzoo_classify --file_path IMAGES --model_prefix_path WS/NAME/mod --label_txt LABELS "
                  "[--save_dir D] [--save_result_txt F] [--repeat N] (bad or valueless argument '" + key + "')");
    args.values[key.substr(2)] = argv[++i];
  }
  for (const char* required : {"file_path", "model_prefix_path", "label_txt"})
    if (!args.values.count(required)) throw Error(std::string("--") + required + " is required");
  if (args.values.count("repeat")) {
    const std::string& n = args.values["repeat"];
    if (n.empty() || n.size() > 9 || !std::all_of(n.begin(), n.end(), ::isdigit) || std::stoi(n) == 0)
      throw Error("--repeat must be a positive number of forward passes, got '" + n + "'");
    args.repeat = std::stoi(n);
  }
  return args;
}

fs::path model_dir(const fs::path& prefix) {  // run.runtime.model_dir
  if (fs::is_directory(prefix)) return prefix;
  std::string name = prefix.filename().string(), ext = prefix.extension().string();
  if (name == "mod" || name == "mod.so" || name == "mod.json" || ext == ".so" || ext == ".json") return prefix.parent_path();
  return prefix;
}

std::vector<fs::path> find_images(const fs::path& root) {  // io.images.find_images
  static const std::set<std::string> suffixes{".jpeg", ".jpg", ".png", ".bmp", ".webp"};
  if (fs::is_regular_file(root)) return {root};
  if (!fs::is_directory(root)) throw Error("image path " + root.string() + " does not exist: give an image file or a folder");
  std::vector<fs::path> found;
  for (auto it = fs::recursive_directory_iterator(root); it != fs::recursive_directory_iterator(); ++it) {
    std::string name = it->path().filename().string(), ext = it->path().extension().string();
    if (name[0] == '.') {
      if (it->is_directory()) it.disable_recursion_pending();
      continue;
    }
    std::transform(ext.begin(), ext.end(), ext.begin(), ::tolower);
    if (suffixes.count(ext) && it->is_regular_file()) found.push_back(it->path());
  }
  std::sort(found.begin(), found.end());  // element by element, as Python sorts Paths
  return found;
}

ffi::Module load_vm(const fs::path& dir) {
  try {
    ffi::Module lib = ffi::Module::LoadFromFile((dir / "mod.so").string());
    ffi::Module vm = lib->GetFunction("vm_load_executable").value()().cast<ffi::Module>();
    vm->GetFunction("vm_initialization").value()(static_cast<int>(kDLCPU), 0, kPooledAllocator);
    return vm;
  } catch (const std::exception& e) {
    std::string what = e.what();
    throw Error("cannot load " + (dir / "mod.so").string() + ": " + what.substr(0, what.find('\n')) +
                ". The file is corrupt or incomplete; recompile with `vamc compile`");
  }
}

tvmzoo::ModelMeta checked_meta(const fs::path& dir) {  // refused before any machine code is loaded
  tvmzoo::ModelMeta meta = tvmzoo::read_meta(dir);
  tvmzoo::check_tvm_version(meta, dir);
  tvmzoo::check_cpu(meta, dir);
  tvmzoo::check_module_file(meta, dir / "mod.so");
  tvmzoo::check_amx(meta, dir);  // before any kernel runs
  return meta;
}

struct Model {
  tvmzoo::ModelMeta meta;
  ffi::Module vm;
  ffi::Function main;
  ffi::Tensor input;

  explicit Model(const fs::path& dir)
      : meta(checked_meta(dir)), vm(load_vm(dir)), main(vm->GetFunction("main").value()) {
    std::vector<int64_t> shape = meta.shape;
    shape[0] = batch();
    DLDataType dtype = meta.fused ? DLDataType{kDLUInt, 8, 1} : DLDataType{kDLFloat, 32, 1};
    input = ffi::Tensor::FromNDAlloc(AlignedAlloc(), ffi::Shape(shape), dtype, DLDevice{kDLCPU, 0});
  }

  int batch() const { return meta.shape[0] > 0 ? int(meta.shape[0]) : 1; }
  size_t image_bytes() const { return size_t(meta.shape[1]) * meta.shape[2] * meta.shape[3] * (meta.fused ? 1 : 4); }

  void fill(int slot, const cv::Mat& bgr) {  // one image into the input tensor, in place
    uint8_t* at = static_cast<uint8_t*>(input.data_ptr()) + slot * image_bytes();
    if (meta.fused) tvmzoo::to_fused(meta.pre, bgr, at, int(meta.shape[2]), int(meta.shape[1]));
    else tvmzoo::to_tensor(meta.pre, bgr, reinterpret_cast<float*>(at));
  }

  ffi::Tensor run() {
    ffi::Any out = main(input);
    if (auto tensor = out.try_cast<ffi::Tensor>()) return *tensor;
    return out.cast<ffi::Array<ffi::Any>>()[0].cast<ffi::Tensor>();  // a tuple: the first output
  }
};

void write_atomically(const fs::path& path, const std::string& text) {
  if (!path.parent_path().empty()) fs::create_directories(path.parent_path());
  fs::path tmp = path.parent_path() / ("." + path.filename().string() + ".tmp");
  {
    std::ofstream f(tmp, std::ios::binary);
    if (!(f << text) || !f.flush()) throw Error("cannot write " + tmp.string());
  }
  fs::rename(tmp, path);
}

int classify(Model& model, const Args& args) {
  auto names = tvmzoo::read_labels(args.values.at("label_txt"));
  auto paths = find_images(args.values.at("file_path"));
  if (paths.empty()) throw Error("no images found at " + args.values.at("file_path") + " (.jpg/.jpeg/.png/.bmp/.webp)");
  std::string lines;
  size_t done = 0, failed = 0;
  auto start = std::chrono::steady_clock::now();
  for (size_t next = 0; next < paths.size();) {
    std::vector<std::string> batch;
    for (; next < paths.size() && int(batch.size()) < model.batch(); ++next) {
      try {
        model.fill(int(batch.size()), tvmzoo::read_image(paths[next]));
        batch.push_back(paths[next].string());
      } catch (const Error& e) {  // this image only: the others are still classified
        std::cerr << "failed: " << paths[next].string() << ": " << e.what() << "\n";
        ++failed;
      }
    }
    if (batch.empty()) continue;
    ffi::Tensor out = model.run();
    const size_t classes = size_t(out.shape()[out.ndim() - 1]);
    for (size_t i = 0; i < batch.size(); ++i)
      lines += tvmzoo::result_lines(batch[i], static_cast<const float*>(out.data_ptr()) + i * classes, classes, names);
    done += batch.size();
  }
  double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  fs::path result = fs::path(args.values.at("save_dir")) / args.values.at("save_result_txt");
  write_atomically(result, lines);
  std::printf("%zu images in %.3f seconds, (%.3f images/second)\n", done, seconds, done / seconds);
  if (failed) std::cerr << failed << " image(s) could not be read (listed above)\n";
  return failed ? 1 : 0;
}

int time_forward(Model& model, const Args& args) {  // vamp's "model latency": forward passes only
  auto paths = find_images(args.values.at("file_path"));
  if (paths.empty()) throw Error("no image to time at " + args.values.at("file_path"));
  for (int slot = 0; slot < model.batch(); ++slot) model.fill(slot, tvmzoo::read_image(paths[0]));
  model.run();  // the first call allocates
  std::vector<double> us;
  for (int i = 0; i < args.repeat; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    model.run();
    us.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(us.begin(), us.end());
  double sum = 0;
  for (double v : us) sum += v;
  std::printf("model latency (us): avg %.1f / min %.1f / max %.1f / p50 %.1f, batch %d\n", sum / us.size(), us.front(),
              us.back(), us[us.size() / 2], model.batch());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    Args args = parse(argc, argv);
    Model model(model_dir(args.values.at("model_prefix_path")));
    return args.repeat > 0 ? time_forward(model, args) : classify(model, args);
  } catch (const std::exception& e) {  // tvmzoo::Error, and anything the filesystem or TVM throws
    std::string what = e.what();
    std::cerr << "error: " << what.substr(0, what.find('\n')) << "\n";
    return 2;
  }
}
