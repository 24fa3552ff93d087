// Runs the UNMODIFIED kernels of ../cuda on the CPU under the CUDA emulator (cuda_emu.h, emu_sched.h, mma.h).
//
//   harness JOB ORDER OUTDIR      ORDER: forward | reverse | shuffle:SEED | greedy | greedy-reverse
//
// JOB is a text file, one directive per line:
//   buffer NAME BYTES in PATH     device buffer filled from a file of exactly BYTES bytes
//   buffer NAME BYTES poison      device buffer filled with 0xff bytes (NaN in f32/f16/bf16): unwritten outputs show
//   launch KERNEL GX GY GZ BX BY BZ ARG...   ARG: buf:NAME:BYTE_OFFSET | i32:V | i64:V | f32:BITS (u32 bit pattern)
//   output NAME                   written to OUTDIR/NAME.bin after all launches
// Every buffer ends right before a PROT_NONE page, so reads or writes past its end fault; the fault handler names
// the buffer. Exit codes: 0 ok, 1 bad job, 2 emulator-detected kernel error (deadlock, divergent barrier, ...),
// 3 memory fault.
//
// NOT checked: accesses before a buffer's start or into another buffer's slack, uninitialised shared memory.
#include <signal.h>

#include <fstream>
#include <iostream>
#include <map>
#include <sstream>

#include "../cuda/flash_attn.cu"
#include "../cuda/group_norm.cu"
#include "../cuda/im2col.cu"
#include "emu_shared.h"

namespace {

struct Buffer {
  char* base = nullptr;  // start of the mapping
  char* data = nullptr;  // first byte of the buffer
  size_t bytes = 0;
  size_t map_bytes = 0;
};
std::map<std::string, Buffer> buffers;

[[noreturn]] void bad_job(const std::string& msg) {
  std::cerr << "harness: " << msg << "\n";
  std::exit(1);
}

void on_fault(int, siginfo_t* info, void*) {
  const char* addr = static_cast<const char*>(info->si_addr);
  std::fprintf(stderr, "cuda-emu: memory fault at %p in block (%u,%u,%u) thread (%u,%u,%u)", info->si_addr,
               blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x, threadIdx.y, threadIdx.z);
  for (const auto& [name, b] : buffers) {
    if (addr >= b.base && addr < b.base + b.map_bytes + 4096)
      std::fprintf(stderr, ": out of bounds of buffer `%s` (%zu bytes) at byte %td", name.c_str(), b.bytes,
                   addr - b.data);
  }
  std::fprintf(stderr, " (else: fiber stack overflow or a wild pointer)\n");
  std::_Exit(3);
}

char alt_stack[64 * 1024];  // not function-local: every function-local static is taken for shared memory

void install_fault_handler() {
  stack_t ss{};
  ss.ss_sp = alt_stack;
  ss.ss_size = sizeof alt_stack;
  sigaltstack(&ss, nullptr);
  struct sigaction sa {};
  sa.sa_sigaction = on_fault;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigaction(SIGSEGV, &sa, nullptr);
  sigaction(SIGBUS, &sa, nullptr);
}

Buffer alloc(size_t bytes) {
  const size_t page = (size_t)sysconf(_SC_PAGESIZE);
  const size_t padded = (bytes + 15) / 16 * 16;  // keep the start 16-byte aligned
  const size_t span = (padded + page - 1) / page * page;
  void* mem = mmap(nullptr, span + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mem == MAP_FAILED) bad_job("cannot map " + std::to_string(bytes) + " bytes");
  mprotect(static_cast<char*>(mem) + span, page, PROT_NONE);
  Buffer b;
  b.base = static_cast<char*>(mem);
  b.data = b.base + span - padded;
  b.bytes = bytes;
  b.map_bytes = span;
  return b;
}

// Typed view of one launch's arguments.
struct Args {
  std::string kernel;
  std::vector<std::string> tok;

  const std::string& at(size_t i, const char* kind) const {
    if (i >= tok.size()) bad_job(kernel + ": missing argument " + std::to_string(i) + " (" + kind + ")");
    if (tok[i].rfind(std::string(kind) + ":", 0) != 0)
      bad_job(kernel + ": argument " + std::to_string(i) + " is `" + tok[i] + "`, expected " + kind);
    return tok[i];
  }
  template <typename T>
  T* ptr(size_t i) const {
    const std::string& t = at(i, "buf");
    const size_t colon = t.rfind(':');
    const std::string name = t.substr(4, colon - 4);
    const auto it = buffers.find(name);
    if (it == buffers.end()) bad_job(kernel + ": unknown buffer " + name);
    const size_t off = std::stoull(t.substr(colon + 1));
    if (off % alignof(T) != 0 || off > it->second.bytes) bad_job(kernel + ": bad offset in " + t);
    return reinterpret_cast<T*>(it->second.data + off);
  }
  int i32(size_t i) const { return std::stoi(at(i, "i32").substr(4)); }
  long long i64(size_t i) const { return std::stoll(at(i, "i64").substr(4)); }
  float f32(size_t i) const { return emu::from_bits((uint32_t)std::stoul(at(i, "f32").substr(4))); }
  void expect(size_t n) const {
    if (tok.size() != n)
      bad_job(kernel + ": " + std::to_string(tok.size()) + " arguments, the kernel takes " + std::to_string(n));
  }
};

#define FLASH(NAME, T)                                                                                          \
  {#NAME, [](const Args& a) {                                                                                   \
     a.expect(17);                                                                                              \
     NAME(a.ptr<const T>(0), a.ptr<const T>(1), a.ptr<const T>(2), a.ptr<T>(3), a.i32(4), a.i32(5), a.i32(6), \
          a.f32(7), a.i64(8), a.i64(9), a.i64(10), a.i64(11), a.i64(12), a.i64(13), a.i64(14), a.i64(15),      \
          a.i64(16));                                                                                           \
   }}
#define GN(SUFFIX, T)                                                                                               \
  {"gn_stats_" #SUFFIX,                                                                                             \
   [](const Args& a) {                                                                                              \
     a.expect(4);                                                                                                   \
     gn_stats_##SUFFIX(a.ptr<const T>(0), a.ptr<float>(1), a.i64(2), a.i32(3));                                     \
   }},                                                                                                              \
  {                                                                                                                 \
    "gn_apply_" #SUFFIX, [](const Args& a) {                                                                        \
      a.expect(9);                                                                                                  \
      gn_apply_##SUFFIX(a.ptr<const T>(0), a.ptr<const float>(1), a.ptr<const float>(2), a.ptr<const float>(3),    \
                        a.ptr<T>(4), a.i64(5), a.i32(6), a.i32(7), a.i32(8));                                       \
    }                                                                                                               \
  }
#define IM2COL_ENTRY(SUFFIX, T)                                                                                \
  {                                                                                                            \
    "im2col_" #SUFFIX, [](const Args& a) {                                                                     \
      a.expect(11);                                                                                            \
      im2col_##SUFFIX(a.ptr<const T>(0), a.ptr<T>(1), a.i32(2), a.i32(3), a.i32(4), a.i32(5), a.i32(6), a.i32(7), \
                      a.i32(8), a.i32(9), a.i32(10));                                                          \
    }                                                                                                          \
  }

const std::map<std::string, void (*)(const Args&)> kernels = {
    FLASH(flash_attn_f16_d16, __half),
    FLASH(flash_attn_f16_d32, __half),
    FLASH(flash_attn_f16_d64, __half),
    FLASH(flash_attn_bf16_d16, __nv_bfloat16),
    FLASH(flash_attn_bf16_d32, __nv_bfloat16),
    FLASH(flash_attn_bf16_d64, __nv_bfloat16),
    GN(f32, float),
    GN(f16, __half),
    GN(bf16, __nv_bfloat16),
    IM2COL_ENTRY(f32, float),
    IM2COL_ENTRY(f16, __half),
    IM2COL_ENTRY(bf16, __nv_bfloat16),
    {"gn_finalize",
     [](const Args& a) {
       a.expect(5);
       gn_finalize(a.ptr<const float>(0), a.ptr<float>(1), a.i32(2), a.i32(3), a.f32(4));
     }},
};

void set_order(const std::string& s) {
  if (s == "forward") {
    emu::set_order(emu::Order::Forward, 0);
  } else if (s == "reverse") {
    emu::set_order(emu::Order::Reverse, 0);
  } else if (s == "greedy") {
    emu::set_order(emu::Order::Greedy, 0);
  } else if (s == "greedy-reverse") {
    emu::set_order(emu::Order::GreedyReverse, 0);
  } else if (s.rfind("shuffle:", 0) == 0) {
    emu::set_order(emu::Order::Shuffle, std::stoull(s.substr(8)));
  } else {
    bad_job("order `" + s + "`: forward, reverse, shuffle:SEED, greedy or greedy-reverse");
  }
}

void read_input(Buffer& b, const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) bad_job("cannot open " + path);
  in.read(b.data, (std::streamsize)b.bytes);
  if ((size_t)in.gcount() != b.bytes || in.peek() != EOF)
    bad_job(path + " does not hold exactly " + std::to_string(b.bytes) + " bytes");
}

void run_launch(std::istringstream& line) {
  Args a;
  unsigned g[3], bl[3];
  line >> a.kernel >> g[0] >> g[1] >> g[2] >> bl[0] >> bl[1] >> bl[2];
  if (!line) bad_job("launch: expected KERNEL GX GY GZ BX BY BZ");
  for (std::string t; line >> t;) a.tok.push_back(t);
  const auto it = kernels.find(a.kernel);
  if (it == kernels.end()) bad_job("unknown kernel " + a.kernel);
  const auto fn = it->second;
  emu::launch(dim3(g[0], g[1], g[2]), dim3(bl[0], bl[1], bl[2]), [&] { fn(a); });
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) bad_job("usage: harness JOB ORDER OUTDIR");
  set_order(argv[2]);
  install_fault_handler();
  if (std::getenv("EMU_LIST_SHARED") != nullptr) {
    emu::find_shared_variables();
    for (const emu::Range& r : emu::shared_ranges) std::fprintf(stderr, "shared %p %zu\n", (void*)r.p, r.n);
  }
  if (emu::find_shared_variables() == 0) bad_job("no __shared__ variables found in the symbol table");
  std::ifstream job(argv[1]);
  if (!job) bad_job(std::string("cannot open job ") + argv[1]);
  std::vector<std::string> outputs;
  for (std::string text; std::getline(job, text);) {
    std::istringstream line(text);
    std::string word;
    if (!(line >> word)) continue;
    if (word == "buffer") {
      std::string name, mode;
      size_t bytes = 0;
      line >> name >> bytes >> mode;
      if (!line || bytes == 0) bad_job("buffer: expected NAME BYTES in PATH | NAME BYTES poison: " + text);
      Buffer b = alloc(bytes);
      if (mode == "in") {
        std::string path;
        line >> path;
        read_input(b, path);
      } else if (mode == "poison") {
        std::memset(b.data, 0xff, bytes);
      } else {
        bad_job("buffer mode `" + mode + "`");
      }
      buffers[name] = b;
    } else if (word == "launch") {
      run_launch(line);
    } else if (word == "output") {
      std::string name;
      line >> name;
      if (!buffers.count(name)) bad_job("output of unknown buffer " + name);
      outputs.push_back(name);
    } else {
      bad_job("unknown directive: " + text);
    }
  }
  for (const std::string& name : outputs) {
    const Buffer& b = buffers[name];
    std::ofstream out(std::string(argv[3]) + "/" + name + ".bin", std::ios::binary);
    out.write(b.data, (std::streamsize)b.bytes);
    if (!out) bad_job("cannot write output " + name);
  }
  return 0;
}
