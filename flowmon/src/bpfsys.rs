//! BPF map operations aya does not wrap, behind small safe functions.

use std::{
    io,
    mem::MaybeUninit,
    os::fd::{AsRawFd as _, BorrowedFd},
};

/// `enum bpf_cmd` in include/uapi/linux/bpf.h.
const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;

/// The `BPF_MAP_*_ELEM` member of `union bpf_attr`.
#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// Reads and deletes `key` in one step (hash and LRU hash maps, Linux 5.14+):
/// no update can land between the read and the delete, so what is returned
/// is everything the entry ever counted. `None` when the key is absent.
pub fn lookup_and_delete<K: aya::Pod, V: aya::Pod>(
    map: BorrowedFd<'_>,
    key: &K,
) -> io::Result<Option<V>> {
    let mut value = MaybeUninit::<V>::zeroed();
    let attr = ElemAttr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: (key as *const K).addr() as u64,
        value: value.as_mut_ptr().addr() as u64,
        flags: 0,
    };
    // Safety: `attr` points to a valid key and a value buffer of the map's
    // value size (V is the map's value type), both live across the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_AND_DELETE_ELEM,
            &raw const attr,
            size_of::<ElemAttr>() as u32,
        )
    };
    if r == 0 {
        // Safety: the kernel filled the whole value; V is Pod, valid for any bytes.
        return Ok(Some(unsafe { value.assume_init() }));
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ENOENT) => Ok(None),
        _ => Err(e),
    }
}
