// CUDA execution emulator, part 4: finds the emulated shared memory. `__shared__` variables are function-local
// statics (cuda_emu.h), which the compiler names `_ZZ...` in the symbol table; this reads the running program's
// ELF symbol table (/proc/self/exe, so the harness must not be stripped) and records every such writable object as a range
// that emu_sched.h fills with 0xff before each block. A program that includes this must have no function-local
// statics other than the kernels' shared variables (the harness keeps its own statics at namespace scope).
//
// NOT emulated: dynamic (extern) shared memory; Linux/ELF64 only.
#pragma once
#include <elf.h>

#include <cstring>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "emu_sched.h"

int main(int, char**);

namespace emu {

// Returns the number of shared variables found; fails when the symbol table cannot be read.
inline size_t find_shared_variables() {
  std::ifstream in("/proc/self/exe", std::ios::binary);
  const std::vector<char> img((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (img.size() < sizeof(Elf64_Ehdr)) fail("cannot read /proc/self/exe");
  const auto* eh = reinterpret_cast<const Elf64_Ehdr*>(img.data());
  if (std::memcmp(eh->e_ident, ELFMAG, SELFMAG) != 0 || eh->e_ident[EI_CLASS] != ELFCLASS64)
    fail("/proc/self/exe is not ELF64");
  const auto* sh = reinterpret_cast<const Elf64_Shdr*>(img.data() + eh->e_shoff);
  std::vector<Range> found;
  intptr_t bias = 0;
  bool have_bias = false;
  for (int i = 0; i < eh->e_shnum; ++i) {
    if (sh[i].sh_type != SHT_SYMTAB) continue;
    const auto* syms = reinterpret_cast<const Elf64_Sym*>(img.data() + sh[i].sh_offset);
    const char* names = img.data() + sh[sh[i].sh_link].sh_offset;
    const size_t n = sh[i].sh_size / sizeof(Elf64_Sym);
    for (size_t k = 0; k < n; ++k) {
      const char* name = names + syms[k].st_name;
      if (std::strcmp(name, "main") == 0) {
        bias = reinterpret_cast<intptr_t>(&main) - (intptr_t)syms[k].st_value;
        have_bias = true;
      }
    }
    for (size_t k = 0; k < n; ++k) {
      const char* name = names + syms[k].st_name;
      const unsigned sec = syms[k].st_shndx;
      const bool writable = sec > 0 && sec < eh->e_shnum && (sh[sec].sh_flags & SHF_WRITE) != 0;
      if (ELF64_ST_TYPE(syms[k].st_info) == STT_OBJECT && std::strncmp(name, "_ZZ", 3) == 0 && syms[k].st_size > 0 &&
          writable)
        found.push_back(Range{reinterpret_cast<char*>((intptr_t)syms[k].st_value), syms[k].st_size});
    }
  }
  if (!have_bias) fail("no symbol table in /proc/self/exe (is the harness stripped?)");
  for (Range& r : found) r.p += bias;
  shared_ranges = found;
  return found.size();
}

}  // namespace emu
