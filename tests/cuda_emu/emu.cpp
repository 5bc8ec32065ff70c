// SIMT emulator runtime: see inc/emu.h.
#include "emu.h"
namespace emu {
Fiber* g_cur; ucontext_t g_sched; uint3 g_blk; dim3 g_bdim, g_gdim; std::vector<Fiber> g_fibers; long long g_ops;
static const std::function<void()>* g_body;
static std::vector<std::vector<char>> g_stacks;
static void entry() { (*g_body)(); g_cur->st = DONE; swapcontext(&g_cur->ctx, &g_sched); }
void launch_impl(dim3 grid, dim3 block, const std::function<void()>& body) {
  const unsigned nthreads = block.x * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || nthreads == 0 || nthreads > 1024) {
    std::fprintf(stderr, "emu: bad launch config grid (%u,%u,%u) block (%u,%u,%u)\n", grid.x,
                 grid.y, grid.z, block.x, block.y, block.z);
    std::abort();
  }
  if (nthreads % 32 != 0) {  // partial warps are legal CUDA, but this emulator does not model them
    std::fprintf(stderr, "emu: block of %u threads is not a whole number of warps\n", nthreads);
    std::abort();
  }
  g_body = &body; g_gdim = grid; g_bdim = block;
  const size_t kStack = 256 * 1024;
  while (g_stacks.size() < nthreads) g_stacks.emplace_back(kStack);
  for (unsigned bz = 0; bz < grid.z; ++bz)
  for (unsigned by = 0; by < grid.y; ++by)
  for (unsigned bx = 0; bx < grid.x; ++bx) {
    g_blk = {bx, by, bz};
    g_fibers.assign(nthreads, Fiber{});
    for (unsigned t = 0; t < nthreads; ++t) {
      Fiber& f = g_fibers[t];
      f.tid = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
      f.linear = t; f.st = READY;
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = g_stacks[t].data(); f.ctx.uc_stack.ss_size = kStack; f.ctx.uc_link = nullptr;
      makecontext(&f.ctx, entry, 0);
    }
    // Run every ready thread until it finishes or waits; release a barrier when all the threads
    // it concerns (the block, or a warp) wait on it; anything else is a deadlock.
    for (;;) {
      bool ran = false;
      for (auto& f : g_fibers) if (f.st == READY) { g_cur = &f; swapcontext(&g_sched, &f.ctx); ran = true; }
      if (ran) continue;
      size_t done = 0, wb = 0;
      for (auto& f : g_fibers) { done += f.st == DONE; wb += f.st == WAIT_BLOCK; }
      if (done == g_fibers.size()) break;
      if (wb == g_fibers.size()) { for (auto& f : g_fibers) f.st = READY; continue; }
      bool released = false;
      for (size_t w = 0; w < g_fibers.size(); w += 32) {
        size_t ww = 0; for (size_t l = 0; l < 32; ++l) ww += g_fibers[w + l].st == WAIT_WARP;
        if (ww == 32) { for (size_t l = 0; l < 32; ++l) g_fibers[w + l].st = READY; released = true; }
      }
      if (released) continue;
      std::fprintf(stderr, "emu: DEADLOCK/divergent barrier in block (%u,%u,%u): done=%zu wait_block=%zu\n",
                   bx, by, bz, done, wb);
      for (size_t w = 0; w < g_fibers.size(); w += 32) {
        std::fprintf(stderr, " warp %zu:", w / 32);
        for (size_t l = 0; l < 32; ++l) std::fprintf(stderr, "%d", (int)g_fibers[w + l].st);
        std::fprintf(stderr, "\n");
      }
      std::abort();
    }
  }
}
}  // namespace emu
