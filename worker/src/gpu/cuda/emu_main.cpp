// Command-line driver of the kernel emulation (emu.h): runs one launch of one of kernels.cu's
// kernels over buffers held in files, as worker/src/gpu/emulator.rs drives it in the tests.
//
//   emu KERNEL GX GY GZ THREADS ARG...
//
// Each ARG is `b:PATH:BYTE_OFFSET` (a buffer read from PATH, passed as a pointer BYTE_OFFSET
// bytes into it), `o:PATH:BYTE_OFFSET` (the same, written back to PATH after the launch),
// `i:N` (int), `l:N` (long long) or `f:X` (float), in the kernel's parameter order.
#include <fstream>
#include <iterator>
#include <map>
#include <string>

#include "kernels.cu"

namespace {

struct Buffer {
  std::string path;
  std::vector<char> bytes;  // over-aligned storage: see `data`
  bool write_back = false;
  char* data() {
    auto p = reinterpret_cast<uintptr_t>(bytes.data());
    return bytes.data() + ((64 - p % 64) % 64);
  }
};

struct AnyPtr {
  char* p;
  template <class T>
  operator T*() const {
    return reinterpret_cast<T*>(p);
  }
};

struct Args {
  std::vector<std::string> raw;
  std::vector<Buffer> buffers;
  std::vector<AnyPtr> ptrs;  // one per argument (null for scalars)

  AnyPtr p(int i) const { return ptrs.at(i); }
  int i(int k) const { return std::stoi(raw.at(k).substr(2)); }
  long long l(int k) const { return std::stoll(raw.at(k).substr(2)); }
  float f(int k) const { return std::stof(raw.at(k).substr(2)); }
};

void load(Args& a) {
  a.buffers.reserve(a.raw.size());
  for (const std::string& s : a.raw) {
    if (s.size() < 2 || s[1] != ':') emu::fail(("bad argument " + s).c_str());
    if (s[0] != 'b' && s[0] != 'o') {
      a.ptrs.push_back(AnyPtr{nullptr});
      continue;
    }
    const size_t colon = s.rfind(':');
    Buffer buf;
    buf.path = s.substr(2, colon - 2);
    buf.write_back = s[0] == 'o';
    std::ifstream in(buf.path, std::ios::binary);
    if (!in) emu::fail(("cannot read " + buf.path).c_str());
    std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    buf.bytes.resize(bytes.size() + 64);
    std::memcpy(buf.data(), bytes.data(), bytes.size());
    const long long offset = std::stoll(s.substr(colon + 1));
    a.buffers.push_back(std::move(buf));
    a.ptrs.push_back(AnyPtr{a.buffers.back().data() + offset});
  }
}

void save(Args& a, const std::vector<long long>& sizes) {
  for (size_t k = 0; k < a.buffers.size(); ++k) {
    Buffer& b = a.buffers[k];
    if (!b.write_back) continue;
    std::ofstream out(b.path, std::ios::binary | std::ios::trunc);
    out.write(b.data(), sizes[k]);
  }
}

using Invoke = std::function<void(const Args&)>;

#define FLASH(NAME)                                                                          \
  {#NAME, [](const Args& a) {                                                                \
     NAME(a.p(0), a.p(1), a.p(2), a.p(3), a.l(4), a.l(5), a.l(6), a.l(7), a.l(8), a.l(9),   \
          a.l(10), a.l(11), a.l(12), a.l(13), a.l(14), a.l(15), a.i(16), a.i(17), a.i(18),   \
          a.f(19), a.i(20));                                                                 \
   }}
#define GN(SUFFIX)                                                                           \
  {"tessera_group_norm_stats_" #SUFFIX,                                                      \
   [](const Args& a) {                                                                       \
     tessera_group_norm_stats_##SUFFIX(a.p(0), a.p(1), a.i(2), a.i(3), a.i(4));              \
   }},                                                                                       \
  {                                                                                          \
    "tessera_group_norm_apply_" #SUFFIX, [](const Args& a) {                                 \
      tessera_group_norm_apply_##SUFFIX(a.p(0), a.p(1), a.p(2), a.p(3), a.p(4), a.i(5),      \
                                        a.i(6), a.i(7), a.i(8), a.i(9), a.f(10), a.i(11));   \
    }                                                                                        \
  }
#define GEGLU(SUFFIX)                                                                        \
  {"tessera_geglu_" #SUFFIX,                                                                 \
   [](const Args& a) { tessera_geglu_##SUFFIX(a.p(0), a.p(1), a.i(2), a.i(3)); }}

const std::map<std::string, Invoke> KERNELS = {
    FLASH(tessera_flash_attn_f16_d16),  FLASH(tessera_flash_attn_f16_d32),
    FLASH(tessera_flash_attn_f16_d64),  FLASH(tessera_flash_attn_f16_d128),
    FLASH(tessera_flash_attn_bf16_d16), FLASH(tessera_flash_attn_bf16_d32),
    FLASH(tessera_flash_attn_bf16_d64), FLASH(tessera_flash_attn_bf16_d128),
    GN(f32),
    GN(f16),
    GN(bf16),
    GEGLU(f32),
    GEGLU(f16),
    GEGLU(bf16),
};

}  // namespace

int main(int argc, char** argv) {
  if (argc < 6) {
    std::fprintf(stderr, "usage: %s KERNEL GX GY GZ THREADS ARG...\n", argv[0]);
    return 2;
  }
  const auto kernel = KERNELS.find(argv[1]);
  if (kernel == KERNELS.end()) emu::fail((std::string("unknown kernel ") + argv[1]).c_str());
  const dim3 grid{(unsigned)std::stoul(argv[2]), (unsigned)std::stoul(argv[3]),
                  (unsigned)std::stoul(argv[4])};
  const dim3 block{(unsigned)std::stoul(argv[5]), 1, 1};
  Args a;
  for (int k = 6; k < argc; ++k) a.raw.push_back(argv[k]);
  load(a);
  std::vector<long long> sizes;
  for (const Buffer& b : a.buffers) sizes.push_back((long long)b.bytes.size() - 64);
  emu::launch(grid, block, [&] { kernel->second(a); });
  save(a, sizes);
  return 0;
}
