//! Function images: the guest kernel's ELF and a function's ELF merged into one PVH ELF.
//!
//! The merged file is the kernel file, unchanged, with the function's `PT_LOAD` segments
//! appended (each at a file offset congruent to its address modulo the page size) and a new
//! program header table after them: the kernel's entries (its `PT_NOTE` with the PVH entry
//! included) followed by the function's loads. The ELF header's `e_phoff`/`e_phnum` point at
//! the new table; the kernel's entry point and section headers are kept.
//!
//! Both inputs are checked, and nothing here panics on a malformed file: the kernel must be
//! a PVH x86-64 executable that lies below `abi::user::USER_START`; the function must start
//! with a valid [`UserHeader`] at `abi::user::IMAGE_START`, and all its segments must lie in
//! `[IMAGE_START, image_end)`, identity-mapped (virtual == physical).

use std::ops::Range;

use fnode_guest::abi::{
    self,
    user::{Layout, LayoutError, UserHeader, HEADER_LEN, IMAGE_START, USER_START},
};

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const ET_EXEC: u16 = 2;
const EM_X86_64: u16 = 62;
const EHDR_LEN: usize = 64;
const PHDR_LEN: usize = 56;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const PT_PHDR: u32 = 6;
/// `XEN_ELFNOTE_PHYS32_ENTRY`: the PVH entry point note (name "Xen").
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
/// ELF's "use the extended numbering" marker for `e_phnum`.
const PN_XNUM: usize = 0xffff;
/// Field offsets in the ELF header.
const E_PHOFF: usize = 32;
const E_PHNUM: usize = 56;
const PAGE: u64 = abi::layout::PAGE_SIZE;

/// Why an image could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("the {0} is not an ELF file")]
    NotElf(&'static str),
    #[error("the {0} is not a 64-bit little-endian ELF file")]
    NotElf64(&'static str),
    #[error(
        "the {what} is built for ELF machine {machine}, not x86-64: build it for \
         x86_64-unknown-none"
    )]
    WrongMachine { what: &'static str, machine: u16 },
    #[error(
        "the {what} is an ELF file of type {e_type}, not a static executable: build it as a \
         binary crate with `-C relocation-model=static` (fnode build does)"
    )]
    NotExecutable { what: &'static str, e_type: u16 },
    #[error("the {what} is truncated or malformed: {detail}")]
    Malformed {
        what: &'static str,
        detail: &'static str,
    },
    #[error(
        "the kernel has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY): it is not an fnode guest \
         kernel"
    )]
    NoPvhNote,
    #[error(
        "the kernel's segment at {start:#x}..{end:#x} reaches into user memory (from \
         {USER_START:#x}): the kernel must lie below it"
    )]
    KernelInUserMemory { start: u64, end: u64 },
    #[error(
        "no fnode function header at {IMAGE_START:#x}: the crate's main.rs must call \
         `fnode_guest::entry!(YourFunction)`, and the crate must be linked with the SDK's \
         linker script (build it with `fnode build`)"
    )]
    NoHeader,
    #[error("the function's header is invalid: {0}")]
    BadHeader(LayoutError),
    #[error(
        "the function's ELF entry point {elf:#x} differs from its header's entry {header:#x}: \
         it was not linked with the SDK's linker script"
    )]
    EntryMismatch { elf: u64, header: u64 },
    #[error(
        "the function's segment at {start:#x}..{end:#x} lies outside its image \
         {IMAGE_START:#x}..{image_end:#x}: link it with the SDK's linker script (fnode build \
         does)"
    )]
    SegmentOutsideImage {
        start: u64,
        end: u64,
        image_end: u64,
    },
    #[error(
        "the function's segment at virtual {vaddr:#x} is loaded at physical {paddr:#x}: \
         function images are identity-mapped"
    )]
    NotIdentityMapped { vaddr: u64, paddr: u64 },
    #[error("the function's segments at {0:#x} and {1:#x} overlap")]
    Overlap(u64, u64),
    #[error("the merged image would have {0} program headers, more than ELF allows")]
    TooManySegments(usize),
}

impl ImageError {
    fn malformed(what: &'static str, detail: &'static str) -> Self {
        ImageError::Malformed { what, detail }
    }
}

/// One program header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub p_type: u32,
    pub flags: u32,
    pub offset: u64,
    pub vaddr: u64,
    pub paddr: u64,
    pub filesz: u64,
    pub memsz: u64,
    pub align: u64,
}

impl Segment {
    /// The guest-physical range the segment occupies.
    pub fn memory(&self) -> Range<u64> {
        self.paddr..self.paddr.saturating_add(self.memsz)
    }

    fn encode(&self) -> [u8; PHDR_LEN] {
        let mut b = [0u8; PHDR_LEN];
        b[0..4].copy_from_slice(&self.p_type.to_le_bytes());
        b[4..8].copy_from_slice(&self.flags.to_le_bytes());
        for (i, v) in [
            self.offset,
            self.vaddr,
            self.paddr,
            self.filesz,
            self.memsz,
            self.align,
        ]
        .iter()
        .enumerate()
        {
            b[8 + 8 * i..16 + 8 * i].copy_from_slice(&v.to_le_bytes());
        }
        b
    }
}

/// A parsed (validated) x86-64 executable.
#[derive(Debug)]
pub struct Elf<'a> {
    data: &'a [u8],
    pub entry: u64,
    pub segments: Vec<Segment>,
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

impl<'a> Elf<'a> {
    /// Parses `data` (the `what` is named in errors: "kernel", "function").
    pub fn parse(data: &'a [u8], what: &'static str) -> Result<Self, ImageError> {
        if data.len() < EHDR_LEN || &data[..4] != ELF_MAGIC {
            return Err(ImageError::NotElf(what));
        }
        if data[4] != ELFCLASS64 || data[5] != ELFDATA2LSB {
            return Err(ImageError::NotElf64(what));
        }
        let bad = |detail| ImageError::malformed(what, detail);
        let e_type = u16_at(data, 16).ok_or_else(|| bad("short header"))?;
        let machine = u16_at(data, 18).ok_or_else(|| bad("short header"))?;
        if machine != EM_X86_64 {
            return Err(ImageError::WrongMachine { what, machine });
        }
        if e_type != ET_EXEC {
            return Err(ImageError::NotExecutable { what, e_type });
        }
        let entry = u64_at(data, 24).ok_or_else(|| bad("short header"))?;
        let phoff = u64_at(data, E_PHOFF).ok_or_else(|| bad("short header"))?;
        let phentsize = u16_at(data, 54).ok_or_else(|| bad("short header"))?;
        let phnum = u16_at(data, E_PHNUM).ok_or_else(|| bad("short header"))?;
        if usize::from(phentsize) != PHDR_LEN {
            return Err(bad("program header entries are not 56 bytes"));
        }
        if usize::from(phnum) == PN_XNUM {
            return Err(bad("extended program header numbering is not supported"));
        }
        let table = usize::try_from(phoff)
            .ok()
            .and_then(|start| data.get(start..start.checked_add(usize::from(phnum) * PHDR_LEN)?))
            .ok_or_else(|| bad("the program header table lies outside the file"))?;
        let mut segments = Vec::with_capacity(usize::from(phnum));
        for ph in table.chunks_exact(PHDR_LEN) {
            // The chunk is exactly PHDR_LEN bytes: every field read succeeds.
            let w = |off| u64_at(ph, off).unwrap_or(0);
            let s = Segment {
                p_type: u32_at(ph, 0).unwrap_or(0),
                flags: u32_at(ph, 4).unwrap_or(0),
                offset: w(8),
                vaddr: w(16),
                paddr: w(24),
                filesz: w(32),
                memsz: w(40),
                align: w(48),
            };
            if s.p_type == PT_LOAD && s.filesz > s.memsz {
                return Err(bad("a load segment's file size exceeds its memory size"));
            }
            if s.filesz > 0 && (s.p_type == PT_LOAD || s.p_type == PT_NOTE) {
                Self::slice(data, s.offset, s.filesz)
                    .ok_or_else(|| bad("a segment's bytes lie outside the file"))?;
            }
            if s.paddr.checked_add(s.memsz).is_none() {
                return Err(bad("a segment's address range overflows"));
            }
            segments.push(s);
        }
        Ok(Elf {
            data,
            entry,
            segments,
        })
    }

    fn slice(data: &[u8], offset: u64, len: u64) -> Option<&[u8]> {
        let start = usize::try_from(offset).ok()?;
        data.get(start..start.checked_add(usize::try_from(len).ok()?)?)
    }

    /// The file bytes of a segment (checked in `parse`).
    fn bytes(&self, s: &Segment) -> &'a [u8] {
        Self::slice(self.data, s.offset, s.filesz).unwrap_or(&[])
    }

    /// Load segments that occupy memory.
    pub fn loads(&self) -> impl Iterator<Item = &Segment> {
        self.segments
            .iter()
            .filter(|s| s.p_type == PT_LOAD && s.memsz > 0)
    }

    /// The PVH entry point from the `XEN_ELFNOTE_PHYS32_ENTRY` note, if any.
    pub fn pvh_entry(&self) -> Option<u32> {
        self.segments
            .iter()
            .filter(|s| s.p_type == PT_NOTE)
            .find_map(|s| {
                let notes = self.bytes(s);
                let mut off = 0usize;
                while off + 12 <= notes.len() {
                    let namesz = u32_at(notes, off)? as usize;
                    let descsz = u32_at(notes, off + 4)? as usize;
                    let n_type = u32_at(notes, off + 8)?;
                    let name = off + 12;
                    let desc = name.checked_add(namesz.next_multiple_of(4))?;
                    if n_type == XEN_ELFNOTE_PHYS32_ENTRY
                        && notes.get(name..name + namesz)? == b"Xen\0"
                    {
                        return u32_at(notes, desc);
                    }
                    off = desc.checked_add(descsz.next_multiple_of(4))?;
                }
                None
            })
    }

    /// The function header: the bytes at `IMAGE_START` in a load segment.
    fn user_header(&self) -> Option<UserHeader> {
        let s = self.loads().find(|s| {
            s.vaddr <= IMAGE_START && IMAGE_START + HEADER_LEN as u64 <= s.vaddr + s.filesz
        })?;
        let off = (IMAGE_START - s.vaddr) as usize;
        UserHeader::decode(self.bytes(s).get(off..off + HEADER_LEN)?.try_into().ok()?)
    }
}

/// What a merged image holds, for the build's report.
#[derive(Debug)]
pub struct ImageInfo {
    /// The kernel's PVH entry point.
    pub pvh_entry: u32,
    /// The kernel's memory, `[start, end)` over its loads.
    pub kernel: Range<u64>,
    /// The function's header.
    pub header: UserHeader,
    /// The function's load segments as placed in the image.
    pub function_segments: Vec<Segment>,
    /// The smallest guest memory (bytes) the function runs in.
    pub min_memory: u64,
}

/// Checks `kernel` and `function` and merges them into one PVH image.
pub fn merge(kernel: &[u8], function: &[u8]) -> Result<(Vec<u8>, ImageInfo), ImageError> {
    let k = Elf::parse(kernel, "kernel")?;
    let f = Elf::parse(function, "function")?;
    let pvh_entry = k.pvh_entry().ok_or(ImageError::NoPvhNote)?;
    let mut kernel_mem: Option<Range<u64>> = None;
    for s in k.loads() {
        let m = s.memory();
        if m.end > USER_START {
            return Err(ImageError::KernelInUserMemory {
                start: m.start,
                end: m.end,
            });
        }
        kernel_mem = Some(match kernel_mem {
            Some(k) => k.start.min(m.start)..k.end.max(m.end),
            None => m,
        });
    }
    let kernel_mem =
        kernel_mem.ok_or_else(|| ImageError::malformed("kernel", "it has no load segments"))?;

    let header = f.user_header().ok_or(ImageError::NoHeader)?;
    let min_memory = match Layout::new(&header, 0) {
        Err(LayoutError::MemoryTooSmall { needed, .. }) => needed,
        Err(e) => return Err(ImageError::BadHeader(e)),
        // Not reached (nothing fits in no memory), but a layout is an answer too.
        Ok(layout) => layout.user_end,
    };
    if f.entry != header.entry {
        return Err(ImageError::EntryMismatch {
            elf: f.entry,
            header: header.entry,
        });
    }
    let mut loads: Vec<Segment> = f.loads().copied().collect();
    loads.sort_by_key(|s| s.vaddr);
    for s in &loads {
        if s.vaddr != s.paddr {
            return Err(ImageError::NotIdentityMapped {
                vaddr: s.vaddr,
                paddr: s.paddr,
            });
        }
        let m = s.memory();
        if m.start < IMAGE_START || m.end > header.image_end {
            return Err(ImageError::SegmentOutsideImage {
                start: m.start,
                end: m.end,
                image_end: header.image_end,
            });
        }
    }
    for w in loads.windows(2) {
        if w[0].memory().end > w[1].vaddr {
            return Err(ImageError::Overlap(w[0].vaddr, w[1].vaddr));
        }
    }

    let kept: Vec<Segment> = k
        .segments
        .iter()
        .filter(|s| s.p_type != PT_PHDR)
        .copied()
        .collect();
    let phnum = kept.len() + loads.len();
    if phnum >= PN_XNUM {
        return Err(ImageError::TooManySegments(phnum));
    }

    let mut out = kernel.to_vec();
    let mut placed = Vec::with_capacity(loads.len());
    for s in &loads {
        let mut seg = Segment {
            align: s.align.max(PAGE),
            ..*s
        };
        if s.filesz > 0 {
            // Keep offset == address (mod page), as mmap-style loaders require.
            let pos = out.len() as u64;
            let pad = (s.vaddr % PAGE + PAGE - pos % PAGE) % PAGE;
            out.resize((pos + pad) as usize, 0);
            seg.offset = out.len() as u64;
            out.extend_from_slice(f.bytes(s));
        } else {
            seg.offset = 0;
        }
        placed.push(seg);
    }
    out.resize(out.len().next_multiple_of(8), 0);
    let phoff = out.len() as u64;
    for s in kept.iter().chain(&placed) {
        out.extend_from_slice(&s.encode());
    }
    out[E_PHOFF..E_PHOFF + 8].copy_from_slice(&phoff.to_le_bytes());
    out[E_PHNUM..E_PHNUM + 2].copy_from_slice(&(phnum as u16).to_le_bytes());

    let info = ImageInfo {
        pvh_entry,
        kernel: kernel_mem,
        header,
        function_segments: placed,
        min_memory,
    };
    Ok((out, info))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds a minimal ELF: `segments` as (type, flags, vaddr, data, memsz), data appended
    /// after the program header table.
    pub(crate) fn elf(entry: u64, segments: &[(u32, u32, u64, Vec<u8>, u64)]) -> Vec<u8> {
        let mut out = vec![0u8; EHDR_LEN + PHDR_LEN * segments.len()];
        out[..4].copy_from_slice(ELF_MAGIC);
        out[4] = ELFCLASS64;
        out[5] = ELFDATA2LSB;
        out[6] = 1;
        out[16..18].copy_from_slice(&ET_EXEC.to_le_bytes());
        out[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        out[24..32].copy_from_slice(&entry.to_le_bytes());
        out[E_PHOFF..E_PHOFF + 8].copy_from_slice(&(EHDR_LEN as u64).to_le_bytes());
        out[52..54].copy_from_slice(&(EHDR_LEN as u16).to_le_bytes());
        out[54..56].copy_from_slice(&(PHDR_LEN as u16).to_le_bytes());
        out[E_PHNUM..E_PHNUM + 2].copy_from_slice(&(segments.len() as u16).to_le_bytes());
        for (i, (p_type, flags, vaddr, data, memsz)) in segments.iter().enumerate() {
            let offset = out.len() as u64;
            out.extend_from_slice(data);
            let s = Segment {
                p_type: *p_type,
                flags: *flags,
                offset,
                vaddr: *vaddr,
                paddr: *vaddr,
                filesz: data.len() as u64,
                memsz: *memsz,
                align: PAGE,
            };
            let at = EHDR_LEN + i * PHDR_LEN;
            out[at..at + PHDR_LEN].copy_from_slice(&s.encode());
        }
        out
    }

    fn pvh_note(entry: u32) -> Vec<u8> {
        let mut n = Vec::new();
        n.extend_from_slice(&4u32.to_le_bytes());
        n.extend_from_slice(&4u32.to_le_bytes());
        n.extend_from_slice(&XEN_ELFNOTE_PHYS32_ENTRY.to_le_bytes());
        n.extend_from_slice(b"Xen\0");
        n.extend_from_slice(&entry.to_le_bytes());
        n
    }

    pub(crate) fn kernel() -> Vec<u8> {
        elf(
            0x10_0000,
            &[
                (PT_LOAD, 7, 0x10_0000, vec![0xcc; 0x3000], 0x8000),
                (PT_NOTE, 4, 0x10_2000, pvh_note(0x10_0000), 0),
            ],
        )
    }

    fn header_bytes(entry: u64, image_end: u64) -> Vec<u8> {
        UserHeader {
            magic: abi::user::HEADER_MAGIC,
            entry,
            image_end,
        }
        .encode()
        .to_vec()
    }

    pub(crate) fn function() -> Vec<u8> {
        let mut first = header_bytes(IMAGE_START + 0x1000, IMAGE_START + 0x4000);
        first.resize(0x100, 0x11);
        elf(
            IMAGE_START + 0x1000,
            &[
                (PT_LOAD, 4, IMAGE_START, first, 0x100),
                (PT_LOAD, 5, IMAGE_START + 0x1000, vec![0x90; 0x800], 0x800),
                (PT_LOAD, 6, IMAGE_START + 0x2000, vec![0x22; 0x10], 0x1800),
                (0x6474_e551, 6, 0, vec![], 0), // PT_GNU_STACK: ignored
            ],
        )
    }

    #[test]
    fn merge_appends_the_function_and_keeps_the_kernel() {
        let (k, f) = (kernel(), function());
        let (image, info) = merge(&k, &f).unwrap();
        assert_eq!(info.pvh_entry, 0x10_0000);
        assert_eq!(info.kernel, 0x10_0000..0x10_8000);
        assert_eq!(info.header.entry, IMAGE_START + 0x1000);
        assert_eq!(info.function_segments.len(), 3);

        // The kernel's bytes are untouched but for the program header fields.
        assert_eq!(image[..E_PHOFF], k[..E_PHOFF]);
        assert_eq!(image[EHDR_LEN..k.len()], k[EHDR_LEN..]);

        let m = Elf::parse(&image, "image").unwrap();
        assert_eq!(m.entry, 0x10_0000);
        assert_eq!(m.pvh_entry(), Some(0x10_0000));
        assert_eq!(m.segments.len(), 2 + 3);
        let loads: Vec<_> = m.loads().collect();
        assert_eq!(loads[0].vaddr, 0x10_0000);
        let fe = Elf::parse(&f, "function").unwrap();
        for (placed, orig) in loads[1..].iter().zip(fe.loads()) {
            assert_eq!(
                (placed.vaddr, placed.memsz, placed.flags),
                (orig.vaddr, orig.memsz, orig.flags)
            );
            assert_eq!(placed.offset % PAGE, placed.vaddr % PAGE);
            assert_eq!(m.bytes(placed), fe.bytes(orig));
        }
        assert_eq!(m.user_header(), Some(info.header));
        assert_eq!(info.min_memory % abi::user::USER_PAGE_SIZE, 0);
        assert!(info.min_memory > IMAGE_START + abi::frame::MAX_PAYLOAD as u64);
    }

    #[test]
    fn merge_rejects_non_functions() {
        let k = kernel();
        // No header at IMAGE_START.
        let plain = elf(IMAGE_START, &[(PT_LOAD, 5, IMAGE_START, vec![0; 64], 64)]);
        assert!(matches!(merge(&k, &plain), Err(ImageError::NoHeader)));
        // A header whose entry lies outside the image.
        let mut h = header_bytes(IMAGE_START + 0x9000, IMAGE_START + 0x1000);
        h.resize(0x100, 0);
        let bad = elf(IMAGE_START + 0x9000, &[(PT_LOAD, 5, IMAGE_START, h, 0x100)]);
        assert!(matches!(
            merge(&k, &bad),
            Err(ImageError::BadHeader(LayoutError::BadEntry(_)))
        ));
        // Not ELF, wrong machine, not an executable.
        assert!(matches!(
            merge(&k, b"#!/bin/sh\n"),
            Err(ImageError::NotElf("function"))
        ));
        let mut arm = function();
        arm[18..20].copy_from_slice(&183u16.to_le_bytes());
        assert!(matches!(
            merge(&k, &arm),
            Err(ImageError::WrongMachine { machine: 183, .. })
        ));
        let mut dynamic = function();
        dynamic[16..18].copy_from_slice(&3u16.to_le_bytes());
        assert!(matches!(
            merge(&k, &dynamic),
            Err(ImageError::NotExecutable { e_type: 3, .. })
        ));
    }

    #[test]
    fn merge_rejects_misplaced_segments() {
        let k = kernel();
        let mut first = header_bytes(IMAGE_START + 0x40, IMAGE_START + 0x2000);
        first.resize(0x100, 0);
        // A segment below IMAGE_START (in the stack area).
        let low = elf(
            IMAGE_START + 0x40,
            &[
                (PT_LOAD, 5, IMAGE_START, first.clone(), 0x100),
                (PT_LOAD, 6, USER_START, vec![1], 1),
            ],
        );
        assert!(matches!(
            merge(&k, &low),
            Err(ImageError::SegmentOutsideImage { .. })
        ));
        // A segment past image_end.
        let high = elf(
            IMAGE_START + 0x40,
            &[(PT_LOAD, 5, IMAGE_START, first.clone(), 0x3000)],
        );
        assert!(matches!(
            merge(&k, &high),
            Err(ImageError::SegmentOutsideImage { .. })
        ));
        // Overlapping segments.
        let overlap = elf(
            IMAGE_START + 0x40,
            &[
                (PT_LOAD, 5, IMAGE_START, first.clone(), 0x200),
                (PT_LOAD, 6, IMAGE_START + 0x100, vec![1], 1),
            ],
        );
        assert!(matches!(merge(&k, &overlap), Err(ImageError::Overlap(..))));
        // An entry that is not the header's.
        let entry = elf(
            IMAGE_START + 0x80,
            &[(PT_LOAD, 5, IMAGE_START, first, 0x100)],
        );
        assert!(matches!(
            merge(&k, &entry),
            Err(ImageError::EntryMismatch { .. })
        ));
    }

    #[test]
    fn merge_rejects_bad_kernels() {
        let f = function();
        let no_note = elf(0x10_0000, &[(PT_LOAD, 7, 0x10_0000, vec![0; 16], 16)]);
        assert!(matches!(merge(&no_note, &f), Err(ImageError::NoPvhNote)));
        let big = elf(
            0x10_0000,
            &[
                (PT_LOAD, 7, 0x10_0000, vec![0; 16], USER_START),
                (PT_NOTE, 4, 0, pvh_note(1), 0),
            ],
        );
        assert!(matches!(
            merge(&big, &f),
            Err(ImageError::KernelInUserMemory { .. })
        ));
    }

    #[test]
    fn parse_never_panics_on_truncated_files() {
        let image = merge(&kernel(), &function()).unwrap().0;
        for len in 0..image.len() {
            let _ = Elf::parse(&image[..len], "image").map(|e| e.pvh_entry());
        }
        // A table that claims to lie past the end of the file.
        let mut k = kernel();
        k[E_PHOFF..E_PHOFF + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            Elf::parse(&k, "kernel"),
            Err(ImageError::Malformed { .. })
        ));
    }
}
