//! What the benchmark reads about its own process: which guest pages the host has backed
//! (`/proc/self/pagemap`), how much memory a process holds (`/proc/<pid>/smaps_rollup`),
//! and the open-file limit density runs need raised.

use std::{fs::File, io, os::unix::fs::FileExt};

use fnode_vmm::MicroVm;
use vm_memory::{GuestMemoryBackend as _, GuestMemoryRegion as _};

/// A `/proc/self/pagemap` entry: the page is in RAM.
const PM_PRESENT: u64 = 1 << 63;
/// A `/proc/self/pagemap` entry: the page is swapped out.
const PM_SWAPPED: u64 = 1 << 62;
/// A `/proc/self/pagemap` entry: a file page or shared anonymous page (clear for the
/// private copy of a `MAP_PRIVATE` file page, made when it was written).
const PM_FILE: u64 = 1 << 61;
/// Pagemap entries read at once (64 KiB of entries, 32 MiB of address space).
const PAGEMAP_CHUNK: usize = 8192;

/// Errors reading the process's own memory accounting.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// A `/proc/self` file could not be read.
    #[error("cannot read {path}: is /proc mounted (and the process alive)?")]
    Proc {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `/proc/self/smaps_rollup` has no line for the field.
    #[error("/proc/self/smaps_rollup has no {0} line (a kernel older than 4.14?)")]
    NoField(&'static str),
    /// A resource limit could not be read or set.
    #[error("cannot raise the open-file limit to {wanted}")]
    Rlimit {
        /// The limit asked for.
        wanted: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// The host page size.
pub fn host_page_size() -> u64 {
    // SAFETY: `_SC_PAGESIZE` is a valid sysconf name; sysconf has no other effect.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).ok().filter(|&s| s > 0).unwrap_or(4096)
}

/// Reads the process's page map, once per count.
#[derive(Debug)]
pub struct PageMap {
    file: File,
    page: u64,
    buf: Vec<u8>,
}

impl PageMap {
    /// Opens `/proc/self/pagemap`.
    pub fn open() -> Result<Self, ProbeError> {
        let path = "/proc/self/pagemap";
        let file = File::open(path).map_err(|source| ProbeError::Proc {
            path: path.into(),
            source,
        })?;
        Ok(PageMap {
            file,
            page: host_page_size(),
            buf: vec![0; PAGEMAP_CHUNK * 8],
        })
    }

    /// Pages of `[addr, addr + len)` the process has mapped in its page tables: for guest
    /// memory, the pages the guest (or the VMM) touched since the mapping was made or since
    /// they were last dropped. A MAP_PRIVATE page the guest only read counts as much as one
    /// it wrote: both cost a host page fault.
    #[cfg(test)]
    pub fn present_pages(&mut self, addr: u64, len: u64) -> Result<u64, ProbeError> {
        Ok(self.count(addr, len)?.0)
    }

    /// `present_pages`, and of those the private anonymous ones (in a
    /// `MAP_PRIVATE` file mapping: the pages written since they were mapped).
    fn count(&mut self, addr: u64, len: u64) -> Result<(u64, u64), ProbeError> {
        let first = addr / self.page;
        let pages = len.div_ceil(self.page);
        let mut count = 0;
        let mut private = 0;
        let mut done = 0;
        while done < pages {
            let n = (pages - done).min(PAGEMAP_CHUNK as u64) as usize;
            let buf = &mut self.buf[..n * 8];
            self.file
                .read_exact_at(buf, (first + done) * 8)
                .map_err(|source| ProbeError::Proc {
                    path: "/proc/self/pagemap".into(),
                    source,
                })?;
            for e in buf.chunks_exact(8) {
                let mut w = [0u8; 8];
                w.copy_from_slice(e);
                let w = u64::from_le_bytes(w);
                if w & (PM_PRESENT | PM_SWAPPED) != 0 {
                    count += 1;
                    if w & PM_FILE == 0 {
                        private += 1;
                    }
                }
            }
            done += n as u64;
        }
        Ok((count, private))
    }

    /// Guest pages of `vm` the host has backed (see `present_pages`), in guest
    /// pages (the host page size on x86-64).
    pub fn guest_pages(&mut self, vm: &MicroVm) -> Result<u64, ProbeError> {
        Ok(self.guest_pages_split(vm)?.0)
    }

    /// [`PageMap::guest_pages`], and of those the private copies: for memory mapped
    /// `MAP_PRIVATE` from a snapshot, the pages written since the mapping was made.
    pub fn guest_pages_split(&mut self, vm: &MicroVm) -> Result<(u64, u64), ProbeError> {
        let mut total = (0, 0);
        for region in vm.memory().iter() {
            let (all, private) = self.count(region.as_ptr() as u64, region.len())?;
            total.0 += all;
            total.1 += private;
        }
        Ok(total)
    }
}

/// A process's memory as `/proc/<pid>/smaps_rollup` counts it, in KiB.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemoryUse {
    /// Resident set size.
    pub rss_kib: u64,
    /// Proportional set size: shared pages divided among the processes that map them.
    pub pss_kib: u64,
}

/// Reads [`MemoryUse`] of this process.
pub fn memory_use() -> Result<MemoryUse, ProbeError> {
    read_rollup("/proc/self/smaps_rollup".into())
}

/// Reads [`MemoryUse`] of the process `pid` (a child of this one, or any this user may
/// inspect).
pub fn memory_use_of(pid: u32) -> Result<MemoryUse, ProbeError> {
    read_rollup(format!("/proc/{pid}/smaps_rollup"))
}

fn read_rollup(path: String) -> Result<MemoryUse, ProbeError> {
    match std::fs::read_to_string(&path) {
        Ok(text) => parse_rollup(&text),
        Err(source) => Err(ProbeError::Proc { path, source }),
    }
}

fn parse_rollup(text: &str) -> Result<MemoryUse, ProbeError> {
    let field = |name: &'static str| {
        text.lines()
            .find_map(|l| {
                let rest = l.strip_prefix(name)?.strip_prefix(':')?;
                rest.split_whitespace().next()?.parse::<u64>().ok()
            })
            .ok_or(ProbeError::NoField(name))
    };
    Ok(MemoryUse {
        rss_kib: field("Rss")?,
        pss_kib: field("Pss")?,
    })
}

/// Raises the soft open-file limit to at least `wanted` (and the hard limit with it when the
/// process may); returns the soft limit now in force, which may be lower than `wanted` when
/// the hard limit cannot be raised.
pub fn raise_open_files(wanted: u64) -> Result<u64, ProbeError> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid rlimit for getrlimit to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(ProbeError::Rlimit {
            wanted,
            source: io::Error::last_os_error(),
        });
    }
    if lim.rlim_cur >= wanted {
        return Ok(lim.rlim_cur);
    }
    if lim.rlim_max < wanted {
        let raised = libc::rlimit {
            rlim_cur: wanted,
            rlim_max: wanted,
        };
        // SAFETY: `raised` is a valid rlimit; raising the hard limit needs CAP_SYS_RESOURCE,
        // and a refusal leaves the limits as they were.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return Ok(wanted);
        }
    }
    let soft = libc::rlimit {
        rlim_cur: wanted.min(lim.rlim_max),
        rlim_max: lim.rlim_max,
    };
    // SAFETY: `soft` is a valid rlimit with the soft limit at most the hard one.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &soft) } != 0 {
        return Err(ProbeError::Rlimit {
            wanted,
            source: io::Error::last_os_error(),
        });
    }
    Ok(soft.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rollup_fields_parse() {
        let text =
            "55586-7fff [rollup]\nRss:                1740 kB\nPss:                 343 kB\n\
                    Pss_Dirty:           112 kB\n";
        assert_eq!(
            parse_rollup(text).unwrap(),
            MemoryUse {
                rss_kib: 1740,
                pss_kib: 343
            }
        );
        let err = parse_rollup("Rss: 1 kB\nPss_Dirty: 2 kB\n").unwrap_err();
        assert!(matches!(err, ProbeError::NoField("Pss")), "{err}");
    }

    #[test]
    fn own_memory_is_readable() {
        let m = memory_use().unwrap();
        assert!(m.rss_kib > 0 && m.pss_kib <= m.rss_kib);
        let by_pid = memory_use_of(std::process::id()).unwrap();
        assert!(by_pid.rss_kib > 0 && by_pid.pss_kib <= by_pid.rss_kib);
        let gone = memory_use_of(u32::MAX).unwrap_err();
        assert!(gone.to_string().contains("smaps_rollup"), "{gone}");
    }

    #[test]
    fn pagemap_counts_touched_pages() {
        let page = host_page_size();
        let len = 16 * page;
        // SAFETY: a fresh anonymous private mapping, unmapped below; no other code uses it.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        let mut pm = PageMap::open().unwrap();
        assert_eq!(pm.present_pages(ptr as u64, len).unwrap(), 0);
        for i in [0u64, 3, 15] {
            // SAFETY: inside the mapping made above.
            unsafe { ptr.cast::<u8>().add((i * page) as usize).write(1) };
        }
        assert_eq!(pm.present_pages(ptr as u64, len).unwrap(), 3);
        // SAFETY: the mapping made above, no longer used.
        unsafe { libc::munmap(ptr, len as usize) };
    }

    #[test]
    fn open_file_limit_is_raised_to_what_is_there() {
        let now = raise_open_files(64).unwrap();
        assert!(now >= 64);
    }
}
