// Writes preference pairs in megatron-core's indexed-dataset format (PREFIX.bin / PREFIX.idx).
//
// One document per pair, three sequences in order prompt, chosen, rejected, exactly as
// megatron.core.datasets.indexed_dataset.IndexedDatasetBuilder lays them out, so that
// IndexedDataset(PREFIX) reads the result unchanged. Tokens are streamed to the .bin file
// batch by batch; only the sequence lengths (12 bytes per pair) stay in memory until the
// .idx is written. The per-token work runs with the GIL released.
//
// .idx layout (little-endian), as megatron-core's _IndexWriter writes it:
//   b"MMIDIDX\x00\x00" | u64 version=1 | u8 dtype code | u64 sequence count |
//   u64 document count | i32 lengths[sequences] | i64 byte pointers[sequences] |
//   i64 document indices[documents]   (0, 3, 6, ..., 3 * pairs)

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

namespace py = pybind11;

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "the indexed-dataset format is little-endian; this writer copies native integers");

namespace {

constexpr char kIndexHeader[9] = {'M', 'M', 'I', 'D', 'I', 'D', 'X', '\0', '\0'};
constexpr uint64_t kIndexVersion = 1;
// megatron.core.datasets.indexed_dataset.DType codes of the two dtypes DType.optimal_dtype picks.
constexpr uint8_t kCodeInt32 = 4;
constexpr uint8_t kCodeUint16 = 8;
constexpr int64_t kSequencesPerPair = 3;
constexpr const char* kSequenceNames[kSequencesPerPair] = {"prompt", "chosen", "rejected"};
constexpr size_t kFileBufferBytes = 1 << 20;
constexpr size_t kCopyChunkBytes = 8 << 20;

// An I/O failure; surfaces in Python as OSError.
struct IoError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

std::string errno_message(const std::string& what, const std::string& path) {
  return what + " " + path + ": " + std::strerror(errno);
}

// An owned FILE*, closed on destruction.
class File {
 public:
  File(const std::string& path, const char* mode) : path_(path), f_(std::fopen(path.c_str(), mode)) {
    if (f_ == nullptr) throw IoError(errno_message("cannot open", path));
  }
  File(const File&) = delete;
  File& operator=(const File&) = delete;
  ~File() {
    if (f_ != nullptr) std::fclose(f_);
  }

  void set_buffer(size_t bytes) { std::setvbuf(f_, nullptr, _IOFBF, bytes); }

  void write(const void* data, size_t bytes) {
    if (bytes != 0 && std::fwrite(data, 1, bytes, f_) != bytes) throw IoError(errno_message("cannot write", path_));
  }

  void read(void* data, size_t bytes) {
    if (bytes != 0 && std::fread(data, 1, bytes, f_) != bytes) {
      throw IoError(std::ferror(f_) ? errno_message("cannot read", path_) : "unexpected end of file in " + path_);
    }
  }

  size_t read_some(void* data, size_t bytes) {
    size_t got = std::fread(data, 1, bytes, f_);
    if (got < bytes && std::ferror(f_)) throw IoError(errno_message("cannot read", path_));
    return got;
  }

  void skip(int64_t bytes) {
    if (std::fseek(f_, static_cast<long>(bytes), SEEK_CUR) != 0) throw IoError(errno_message("cannot seek", path_));
  }

  // Flush, fsync and close, so that a later rename publishes complete contents.
  void sync_and_close() {
    bool ok = std::fflush(f_) == 0 && ::fsync(fileno(f_)) == 0;
    int close_rc = std::fclose(f_);
    f_ = nullptr;
    if (!ok || close_rc != 0) throw IoError(errno_message("cannot flush", path_));
  }

  int64_t size() const {
    struct stat st;
    if (::fstat(fileno(f_), &st) != 0) throw IoError(errno_message("cannot stat", path_));
    return static_cast<int64_t>(st.st_size);
  }

 private:
  std::string path_;
  std::FILE* f_;
};

size_t itemsize(uint8_t code) { return code == kCodeUint16 ? 2 : 4; }

const char* dtype_name(uint8_t code) {
  switch (code) {
    case 1: return "uint8";
    case 2: return "int8";
    case 3: return "int16";
    case 4: return "int32";
    case 5: return "int64";
    case 6: return "float64";
    case 7: return "float32";
    case 8: return "uint16";
    default: return "unknown";
  }
}

template <typename T>
void write_pod(File& f, T value) {
  f.write(&value, sizeof(T));
}

template <typename T>
T read_pod(File& f) {
  T value;
  f.read(&value, sizeof(T));
  return value;
}

// Writes the pairs of one output .bin and, on finalize, its .idx.
class PairBuilder {
 public:
  PairBuilder(const std::string& bin_path, int dtype_code, int64_t vocab_size)
      : code_(static_cast<uint8_t>(dtype_code)), vocab_size_(vocab_size) {
    if (dtype_code != kCodeUint16 && dtype_code != kCodeInt32) {
      throw py::value_error("dtype_code must be " + std::to_string(kCodeUint16) + " (uint16) or " +
                            std::to_string(kCodeInt32) + " (int32), got " + std::to_string(dtype_code));
    }
    int64_t limit = code_ == kCodeUint16 ? (int64_t{1} << 16) : (int64_t{1} << 31);
    if (vocab_size < 1 || vocab_size > limit) {
      throw py::value_error("vocab_size " + std::to_string(vocab_size) + " does not fit dtype " + dtype_name(code_));
    }
    bin_ = std::make_unique<File>(bin_path, "wb");
    bin_->set_buffer(kFileBufferBytes);
  }

  // Appends n pairs: tokens[offsets[3i]:offsets[3i+1]] is pair i's prompt, then chosen, rejected.
  void add_batch(const py::array& tokens, const py::array& offsets) {
    if (tokens.ndim() != 1) throw py::value_error("tokens must be a 1-D array");
    auto offs = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(offsets);
    if (!offs || offs.ndim() != 1) throw py::value_error("seq_offsets must be a 1-D integer array");
    py::dtype dt = tokens.dtype();
    if (dt.kind() != 'i' && dt.kind() != 'u') {
      throw py::type_error(std::string("tokens must be an integer array, got dtype kind '") + dt.kind() + "'");
    }
    switch ((dt.kind() == 'u' ? 100 : 0) + dt.itemsize()) {
      case 2: return add_batch_from<int16_t>(tokens, offs);
      case 4: return add_batch_from<int32_t>(tokens, offs);
      case 8: return add_batch_from<int64_t>(tokens, offs);
      case 102: return add_batch_from<uint16_t>(tokens, offs);
      case 104: return add_batch_from<uint32_t>(tokens, offs);
      case 108: return add_batch_from<uint64_t>(tokens, offs);
      default: throw py::type_error("tokens must be a 16, 32 or 64-bit integer array");
    }
  }

  // Appends every pair of another pair dataset (like IndexedDatasetBuilder.add_index).
  void add_index(const std::string& idx_path, const std::string& bin_path) {
    py::gil_scoped_release release;
    std::lock_guard<std::mutex> lock(mutex_);
    check_open();

    File idx(idx_path, "rb");
    char header[sizeof(kIndexHeader)];
    idx.read(header, sizeof(header));
    if (std::memcmp(header, kIndexHeader, sizeof(header)) != 0) {
      throw py::value_error(idx_path + ": not a megatron indexed-dataset index (bad header)");
    }
    auto version = read_pod<uint64_t>(idx);
    if (version != kIndexVersion) throw py::value_error(idx_path + ": unsupported index version " + std::to_string(version));
    auto code = read_pod<uint8_t>(idx);
    if (code != code_) {
      throw py::value_error(idx_path + ": tokens are " + dtype_name(code) + ", this output is " + dtype_name(code_) +
                            " (datasets written for different vocabulary sizes cannot be merged)");
    }
    auto raw_sequences = read_pod<uint64_t>(idx);
    auto raw_documents = read_pod<uint64_t>(idx);
    auto idx_bytes = static_cast<uint64_t>(idx.size());
    if (raw_sequences > idx_bytes || raw_documents > idx_bytes) {
      throw py::value_error(idx_path + ": sequence or document count exceeds the file size (corrupt index)");
    }
    auto sequences = static_cast<int64_t>(raw_sequences);
    auto documents = static_cast<int64_t>(raw_documents);
    int64_t pairs = sequences / kSequencesPerPair;
    if (sequences % kSequencesPerPair != 0 || documents != pairs + 1) {
      throw py::value_error(idx_path + ": " + std::to_string(sequences) + " sequences in " +
                            std::to_string(documents - 1) + " documents is not a preference-pair dataset");
    }
    int64_t expected_idx_bytes = 34 + sequences * (4 + 8) + documents * 8;
    if (idx.size() != expected_idx_bytes) {
      throw py::value_error(idx_path + ": size " + std::to_string(idx.size()) + " bytes, expected " +
                            std::to_string(expected_idx_bytes) + " (a multimodal or corrupt index?)");
    }
    std::vector<int32_t> lengths(static_cast<size_t>(sequences));
    idx.read(lengths.data(), lengths.size() * sizeof(int32_t));
    idx.skip(sequences * static_cast<int64_t>(sizeof(int64_t)));  // pointers follow from the lengths
    std::vector<int64_t> doc_indices(static_cast<size_t>(documents));
    idx.read(doc_indices.data(), doc_indices.size() * sizeof(int64_t));
    for (int64_t d = 0; d < documents; ++d) {
      if (doc_indices[d] != d * kSequencesPerPair) {
        throw py::value_error(idx_path + ": document " + std::to_string(d) + " does not hold exactly three sequences");
      }
    }
    int64_t tokens = 0;
    for (int32_t len : lengths) {
      if (len < 1) throw py::value_error(idx_path + ": holds an empty sequence");
      tokens += len;
    }

    File bin(bin_path, "rb");
    int64_t expected_bin_bytes = tokens * static_cast<int64_t>(itemsize(code_));
    if (bin.size() != expected_bin_bytes) {
      throw py::value_error(bin_path + ": size " + std::to_string(bin.size()) + " bytes, its index expects " +
                            std::to_string(expected_bin_bytes));
    }
    std::vector<char> chunk(kCopyChunkBytes);
    failed_ = true;  // a failure while copying leaves this output inconsistent
    for (int64_t left = expected_bin_bytes; left > 0;) {
      size_t want = static_cast<size_t>(std::min<int64_t>(left, static_cast<int64_t>(chunk.size())));
      size_t got = bin.read_some(chunk.data(), want);
      if (got == 0) throw IoError("unexpected end of file in " + bin_path);
      bin_->write(chunk.data(), got);
      left -= static_cast<int64_t>(got);
    }
    failed_ = false;
    lengths_.insert(lengths_.end(), lengths.begin(), lengths.end());
    tokens_ += tokens;
  }

  // Closes the .bin and writes the .idx; the builder takes no more pairs afterwards.
  void finalize(const std::string& idx_path) {
    py::gil_scoped_release release;
    std::lock_guard<std::mutex> lock(mutex_);
    check_open();
    failed_ = true;
    bin_->sync_and_close();
    bin_.reset();

    File idx(idx_path, "wb");
    idx.set_buffer(kFileBufferBytes);
    auto sequences = static_cast<int64_t>(lengths_.size());
    int64_t documents = sequences / kSequencesPerPair + 1;
    idx.write(kIndexHeader, sizeof(kIndexHeader));
    write_pod<uint64_t>(idx, kIndexVersion);
    write_pod<uint8_t>(idx, code_);
    write_pod<uint64_t>(idx, static_cast<uint64_t>(sequences));
    write_pod<uint64_t>(idx, static_cast<uint64_t>(documents));
    idx.write(lengths_.data(), lengths_.size() * sizeof(int32_t));
    std::vector<int64_t> buffer;
    buffer.reserve(1 << 16);
    auto flush = [&] {
      idx.write(buffer.data(), buffer.size() * sizeof(int64_t));
      buffer.clear();
    };
    int64_t pointer = 0;
    for (int32_t len : lengths_) {
      buffer.push_back(pointer);
      pointer += static_cast<int64_t>(len) * static_cast<int64_t>(itemsize(code_));
      if (buffer.size() == buffer.capacity()) flush();
    }
    flush();
    for (int64_t d = 0; d < documents; ++d) {
      buffer.push_back(d * kSequencesPerPair);
      if (buffer.size() == buffer.capacity()) flush();
    }
    flush();
    idx.sync_and_close();
    failed_ = false;
    finalized_ = true;
  }

  // Closes the .bin without writing an index; the caller removes the files.
  void abort() {
    std::lock_guard<std::mutex> lock(mutex_);
    bin_.reset();
    finalized_ = true;
  }

  int64_t num_pairs() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return static_cast<int64_t>(lengths_.size()) / kSequencesPerPair;
  }
  int64_t num_tokens() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return tokens_;
  }
  int dtype_code() const { return code_; }
  int64_t vocab_size() const { return vocab_size_; }

  py::array_t<int32_t> sequence_lengths() const {
    std::lock_guard<std::mutex> lock(mutex_);
    py::array_t<int32_t> out(static_cast<py::ssize_t>(lengths_.size()));
    if (!lengths_.empty()) std::memcpy(out.mutable_data(), lengths_.data(), lengths_.size() * sizeof(int32_t));
    return out;
  }

 private:
  void check_open() const {
    if (finalized_) throw std::runtime_error("the pair builder is already finalized or aborted");
    if (failed_) throw std::runtime_error("the pair builder failed earlier; its output is incomplete");
  }

  template <typename In>
  void add_batch_from(const py::array& tokens_obj, const py::array_t<int64_t>& offs) {
    auto tokens = py::array_t<In, py::array::c_style>::ensure(tokens_obj);
    const In* src = tokens.data();
    const int64_t* off = offs.data();
    auto n_tokens = static_cast<int64_t>(tokens.size());
    auto n_offsets = static_cast<int64_t>(offs.size());
    if (n_offsets % kSequencesPerPair != 1) {
      throw py::value_error("seq_offsets must hold 3 * pairs + 1 entries, got " + std::to_string(n_offsets));
    }
    py::gil_scoped_release release;
    std::lock_guard<std::mutex> lock(mutex_);
    check_open();

    if (off[0] != 0 || off[n_offsets - 1] != n_tokens) {
      throw py::value_error("seq_offsets must run from 0 to len(tokens) = " + std::to_string(n_tokens) + ", got " +
                            std::to_string(off[0]) + " .. " + std::to_string(off[n_offsets - 1]));
    }
    for (int64_t s = 0; s + 1 < n_offsets; ++s) {
      int64_t len = off[s + 1] - off[s];
      if (len < 1 || len > std::numeric_limits<int32_t>::max()) {
        throw py::value_error("pair " + std::to_string(s / kSequencesPerPair) + " of the batch: " +
                              kSequenceNames[s % kSequencesPerPair] + " has " + std::to_string(len) +
                              " tokens (must be at least 1 and fit int32)");
      }
    }
    int64_t bad = code_ == kCodeUint16 ? convert<In, uint16_t>(src, n_tokens) : convert<In, int32_t>(src, n_tokens);
    if (bad >= 0) {
      int64_t s = std::upper_bound(off, off + n_offsets, bad) - off - 1;
      throw py::value_error("pair " + std::to_string(s / kSequencesPerPair) + " of the batch: " +
                            kSequenceNames[s % kSequencesPerPair] + " holds token id " +
                            std::to_string(static_cast<long long>(src[bad])) + ", outside the vocabulary [0, " +
                            std::to_string(vocab_size_) + ")");
    }
    failed_ = true;  // a partial write leaves this output inconsistent
    bin_->write(scratch_.data(), scratch_.size());
    failed_ = false;
    for (int64_t s = 0; s + 1 < n_offsets; ++s) lengths_.push_back(static_cast<int32_t>(off[s + 1] - off[s]));
    tokens_ += n_tokens;
  }

  // Converts n tokens into scratch_ as Out; returns the position of the first id outside
  // [0, vocab_size), or -1 when all are valid.
  template <typename In, typename Out>
  int64_t convert(const In* src, int64_t n) {
    scratch_.resize(static_cast<size_t>(n) * sizeof(Out));
    Out* dst = reinterpret_cast<Out*>(scratch_.data());
    const auto vocab = static_cast<uint64_t>(vocab_size_);
    bool ok = true;
    for (int64_t i = 0; i < n; ++i) {
      In v = src[i];
      if constexpr (std::is_signed_v<In>) ok &= v >= 0;
      ok &= static_cast<uint64_t>(v) < vocab;
      dst[i] = static_cast<Out>(v);
    }
    if (ok) return -1;
    for (int64_t i = 0; i < n; ++i) {
      In v = src[i];
      if ((std::is_signed_v<In> && v < 0) || static_cast<uint64_t>(v) >= vocab) return i;
    }
    return -1;
  }

  const uint8_t code_;
  const int64_t vocab_size_;
  std::unique_ptr<File> bin_;
  std::vector<int32_t> lengths_;
  std::vector<char> scratch_;
  int64_t tokens_ = 0;
  bool finalized_ = false;
  bool failed_ = false;
  mutable std::mutex mutex_;
};

}  // namespace

PYBIND11_MODULE(_pair_builder, m) {
  m.doc() = "Writes preference pairs (prompt, chosen, rejected) as a megatron-core indexed dataset.";
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const IoError& e) {
      PyErr_SetString(PyExc_OSError, e.what());
    }
  });
  py::class_<PairBuilder>(m, "PairBuilder")
      .def(py::init<const std::string&, int, int64_t>(), py::arg("bin_path"), py::arg("dtype_code"),
           py::arg("vocab_size"),
           "Open BIN_PATH for writing tokens of DType code dtype_code (8 uint16, 4 int32); ids must be "
           "in [0, vocab_size).")
      .def("add_batch", &PairBuilder::add_batch, py::arg("tokens"), py::arg("seq_offsets"),
           "Append len(seq_offsets) // 3 pairs: tokens[seq_offsets[3i]:seq_offsets[3i+1]] is pair i's "
           "prompt, then its chosen and rejected response. Every sequence must be non-empty.")
      .def("add_index", &PairBuilder::add_index, py::arg("idx_path"), py::arg("bin_path"),
           "Append every pair of another pair dataset written with the same dtype.")
      .def("finalize", &PairBuilder::finalize, py::arg("idx_path"), "Close the .bin and write the .idx.")
      .def("abort", &PairBuilder::abort, "Close the .bin without writing an index.")
      .def_property_readonly("num_pairs", &PairBuilder::num_pairs)
      .def_property_readonly("num_tokens", &PairBuilder::num_tokens)
      .def_property_readonly("dtype_code", &PairBuilder::dtype_code)
      .def_property_readonly("vocab_size", &PairBuilder::vocab_size)
      .def("sequence_lengths", &PairBuilder::sequence_lengths,
           "Lengths of all sequences written so far (prompt, chosen, rejected per pair), int32.");
}
