//! mimalloc as the global allocator.
//!
//! The `mimalloc` crate's `GlobalAlloc` passes every request to
//! `mi_malloc_aligned`, and mimalloc v3 sends an aligned request that is not
//! a power-of-two block of 1 KiB or less down its generic path (and may
//! over-allocate it): on penstock's request path about ten allocations a
//! request paid some 110 instructions each for an alignment every block has
//! anyway. Every mimalloc block is a multiple of the word size from a
//! 16-aligned page start, so a request aligned to a word or less takes the
//! plain `mi_malloc` / `mi_zalloc` / `mi_realloc`; a larger alignment keeps
//! the aligned calls.
#![no_std]

use core::alloc::{GlobalAlloc, Layout};

use libmimalloc_sys as mi;

/// The global allocator: `#[global_allocator] static A: mialloc::Mimalloc = mialloc::Mimalloc;`
pub struct Mimalloc;

/// The alignment every mimalloc block has.
const WORD: usize = core::mem::size_of::<usize>();

/// mimalloc's plain call for a layout aligned to a word or less, else its
/// aligned one.
///
/// # Safety
/// `plain` and `aligned` are mimalloc's allocating calls (`mi_malloc` and
/// `mi_malloc_aligned`, or the zeroing pair), which take any size and a
/// power-of-two alignment, and return null when out of memory.
#[inline]
unsafe fn by_alignment(
    layout: Layout,
    plain: unsafe extern "C" fn(usize) -> *mut core::ffi::c_void,
    aligned: unsafe extern "C" fn(usize, usize) -> *mut core::ffi::c_void,
) -> *mut u8 {
    // SAFETY: the caller passes mimalloc's calls; a `Layout`'s alignment is a
    // power of two.
    unsafe {
        match layout.align() <= WORD {
            true => plain(layout.size()),
            false => aligned(layout.size(), layout.align()),
        }
    }
    .cast()
}

// SAFETY: each call is mimalloc's for the same request; blocks from the plain
// calls are word-aligned (see above), and those calls are only made when the
// layout asks for no more. `mi_free` frees blocks from either kind of call.
unsafe impl GlobalAlloc for Mimalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: mimalloc's allocating pair.
        unsafe { by_alignment(layout, mi::mi_malloc, mi::mi_malloc_aligned) }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: mimalloc's zeroing pair.
        unsafe { by_alignment(layout, mi::mi_zalloc, mi::mi_zalloc_aligned) }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from this allocator.
        unsafe { mi::mi_free(ptr.cast()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from this allocator with `layout`'s alignment,
        // which the new block keeps.
        unsafe {
            match layout.align() <= WORD {
                true => mi::mi_realloc(ptr.cast(), new_size),
                false => mi::mi_realloc_aligned(ptr.cast(), new_size, layout.align()),
            }
        }
        .cast()
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    /// Every alignment from 1 to 4 KiB, at sizes around and across the
    /// allocator's size classes, comes back aligned, zeroed when asked, and
    /// keeps its bytes through a reallocation.
    #[test]
    fn blocks_are_aligned_zeroed_and_kept() {
        let a = Mimalloc;
        let mut live = Vec::new();
        for shift in 0..=12 {
            let align = 1usize << shift;
            for size in [
                1, 7, 8, 9, 15, 16, 24, 40, 48, 100, 1000, 1024, 1025, 5000, 70_000,
            ] {
                let layout = Layout::from_size_align(size, align).unwrap();
                // SAFETY: a non-zero size; each block is freed below with its layout.
                unsafe {
                    let p = a.alloc(layout);
                    assert!(!p.is_null());
                    assert_eq!(p as usize % align, 0, "size {size} align {align}");
                    p.write_bytes(0xAB, size);
                    let z = a.alloc_zeroed(layout);
                    assert_eq!(z as usize % align, 0);
                    assert!((0..size).all(|i| *z.add(i) == 0));
                    let grown = a.realloc(p, layout, size * 3);
                    assert_eq!(grown as usize % align, 0);
                    assert!((0..size).all(|i| *grown.add(i) == 0xAB));
                    a.dealloc(z, layout);
                    live.push((grown, Layout::from_size_align(size * 3, align).unwrap()));
                }
            }
        }
        for (p, layout) in live {
            // SAFETY: allocated above with this layout.
            unsafe { a.dealloc(p, layout) }
        }
    }
}
