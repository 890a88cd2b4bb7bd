"""The context-parallel scan (one long sequence in P pieces, see config.cp_pieces): after the maps pass,
piece p + 1 starts from

    start[p + 1] = start[p + 1] + start[p] @ map[p]        p = 1 .. P - 2, in order

with start[p] = cp_ws[p, hv, :V] ([V, K] fp32) and map[p] = cp_ws[p, hv, V:] ([K, K]). A row of a start
depends only on the same row of the previous start, so one CTA owns SCAN_ROWS rows of one value head
through all pieces: its rows of the running start stay in shared memory, each map is staged into shared
memory once per piece, and thread c computes column c of the CTA's rows with fp32 FMAs in k order (IEEE
fp32 whatever torch's TF32 setting; one launch for all pieces instead of P - 2 matrix products).
"""

import cutlass
import cutlass.cute as cute
from cutlass import Float32

from ..common.exact import fma_rn

SCAN_ROWS = 8  # rows of a start per CTA: V / 8 CTAs per value head (256 at HV = 16), 68 KiB of shared memory


class ScanRoles:
    def launch_scan(self, mCp: cute.Tensor, stream):
        K, V, R = self.K, self.V, SCAN_ROWS

        @cute.struct
        class ScanStorage:
            sS: cute.struct.Align[cute.struct.MemRange[Float32, R * K], 16]  # the CTA's rows of start[p]
            sM: cute.struct.Align[cute.struct.MemRange[Float32, K * K], 16]  # map[p]

        self.scan_storage = ScanStorage
        self.scan_kernel(mCp).launch(grid=(V // R, self.num_v_heads, 1), block=(K, 1, 1), stream=stream,
                                     smem=ScanStorage.size_in_bytes())

    @cute.kernel
    def scan_kernel(self, mCp: cute.Tensor):
        K, V, R = self.K, self.V, SCAN_ROWS
        c, _, _ = cute.arch.thread_idx()
        rb, hv, _ = cute.arch.block_idx()
        r0 = rb * R
        storage = cutlass.memory.SmemAllocator().allocate(self.scan_storage)
        sS = storage.sS.get_tensor(cute.make_layout((R, K), stride=(K, 1)))
        sM = storage.sM.get_tensor(cute.make_layout((K, K), stride=(K, 1)))
        acc = cute.make_rmem_tensor((R,), Float32)
        for r in cutlass.range_constexpr(R):
            sS[r, c] = mCp[1, hv, r0 + r, c]
        for p in cutlass.range(1, mCp.shape[0] - 1):
            for k in cutlass.range_constexpr(K):
                sM[k, c] = mCp[p, hv, V + k, c]
            for r in cutlass.range_constexpr(R):
                acc[r] = mCp[p + 1, hv, r0 + r, c]
            cute.arch.sync_threads()
            for k in cutlass.range(K, unroll=8):
                m = sM[k, c]
                for r in cutlass.range_constexpr(R):
                    acc[r] = fma_rn(sS[r, k], m, acc[r])
            cute.arch.sync_threads()
            for r in cutlass.range_constexpr(R):
                sS[r, c] = acc[r]
                mCp[p + 1, hv, r0 + r, c] = acc[r]
            cute.arch.sync_threads()
