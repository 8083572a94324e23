//! Array maps mapped into this process (aya does not wrap `mmap` of maps),
//! behind small safe types.

use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd},
};

/// The value of a one-entry array map created with `BPF_F_MMAPABLE`, mapped
/// into this process: read and written in place, without a syscall.
pub struct Mapped<T>(MappedArray<T>);

impl<T: aya::Pod> Mapped<T> {
    /// Maps the value of the array map `map`, whose value type is `T`.
    pub fn new(map: BorrowedFd<'_>) -> io::Result<Self> {
        MappedArray::new(map, 1).map(Self)
    }

    /// The value. BPF programs change it only while this process runs them
    /// through a syscall: take a fresh reference after each such call, and
    /// hold none across it.
    pub fn get_mut(&mut self) -> &mut T {
        // Safety: mapped, page-aligned, T is Pod (valid for any bytes), and
        // `&mut self` makes this the only reference.
        unsafe { &mut *self.0.ptr(0) }
    }
}

/// Every element of an array map created with `BPF_F_MMAPABLE`, mapped into
/// this process. The programs write it while it is read: every access is a
/// volatile copy through a raw pointer, never a reference.
pub struct MappedArray<T> {
    ptr: std::ptr::NonNull<T>,
    /// Elements.
    len: usize,
    bytes: usize,
}

// Safety: as for `Mapped`; the memory is shared with the kernel, and only
// reached through volatile copies.
unsafe impl<T: Send> Send for MappedArray<T> {}
// Safety: no method hands out references into the mapping.
unsafe impl<T: Send> Sync for MappedArray<T> {}

impl<T: aya::Pod> MappedArray<T> {
    /// Maps the `len` elements of the array map `map`, whose value type is
    /// `T` (a multiple of 8 bytes, so elements lie back to back).
    pub fn new(map: BorrowedFd<'_>, len: usize) -> io::Result<Self> {
        assert!(size_of::<T>() % 8 == 0, "array elements are 8-byte aligned");
        // Safety: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let bytes = (size_of::<T>() * len).div_ceil(page).max(1) * page;
        // Safety: as in `Mapped::new`.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = std::ptr::NonNull::new(ptr.cast::<T>()).ok_or(io::ErrorKind::Other)?;
        Ok(Self { ptr, len, bytes })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Element `i`'s address. Panics past the end.
    pub fn ptr(&self, i: usize) -> *mut T {
        assert!(i < self.len, "element {i} of {}", self.len);
        // Safety: within the mapping, as just checked.
        unsafe { self.ptr.as_ptr().add(i) }
    }

    /// A copy of element `i` as it is now (fields another CPU is writing
    /// may be mid-update).
    pub fn read(&self, i: usize) -> T {
        // Safety: a valid, aligned element; T is Pod.
        unsafe { self.ptr(i).read_volatile() }
    }
}

impl<T> Drop for MappedArray<T> {
    fn drop(&mut self) {
        // Safety: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.bytes) };
    }
}
