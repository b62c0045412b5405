import CKernels

/// How the process's allocator treats the large activation buffers every forward pass allocates
/// and frees (a batch of 8 images' MLP activations is 150 MB).
public enum AllocatorTuning {
    /// Keeps freed memory in the process for the next pass instead of returning it to the
    /// system: glibc serves buffers above 32 MB with a fresh `mmap` by default and unmaps them when
    /// freed, so every pass page-faults and the kernel zeroes each page again (measured: a fifth of
    /// the CPU time of admitting 16 images, and batching images then cost more per image than one
    /// at a time). With `mmap` off for allocations and trimming only past 2 GB of free memory at
    /// the top of the heap, a buffer of the same size is reused from the heap. Memory then stays at
    /// its high-water mark, which a batch process reaches on its first batch anyway. Elsewhere than
    /// glibc, nothing changes.
    public static func reuseFreedMemory() {
        dl_reuse_freed_memory()
    }
}
