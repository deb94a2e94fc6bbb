//! Transparent huge pages for ONNX Runtime's memory.
//!
//! Decoding a large model streams every weight through the CPU once per token. With 4 KiB pages that
//! takes one TLB entry per 4 KiB of weights (about 120,000 per token for a GPT-2-small-sized model),
//! and on the machine measured they cost about 14 % of the decode time (TPOT 26.3 ms against 22.5;
//! README: Generative models). ONNX Runtime allocates with the C library's `malloc`, out of reach from
//! here, so once a model is loaded [`back_with_huge_pages`] finds the process's large anonymous
//! mappings (the heap and the big `malloc` blocks that hold the weights) and asks the kernel to put
//! them on transparent huge pages: `madvise(MADV_HUGEPAGE)`, then `MADV_COLLAPSE` (Linux 6.1 and
//! newer), which moves what is already there onto huge pages at once. In `madvise` mode the advice is
//! then taken back, so memory first touched later (in a timed phase, say) gets small pages as before.
//!
//! glibc's own tunable, `glibc.malloc.hugetlb=1`, would do the first half from the start, but glibc
//! 2.36 honours it in only some processes (here, 12 of 20 starts of the same binary), so it is not
//! relied on.
//!
//! Nothing changes where the kernel gives no huge pages (`transparent_hugepage` set to `never`, or
//! absent). [`MemoryState`] says what was in effect; every run's record carries it.

/// Huge page size on x86-64 and on aarch64 with 4 KiB pages.
const HUGE: usize = 2 << 20;

const THP_ENABLED: &str = "/sys/kernel/mm/transparent_hugepage/enabled";

/// The kernel's transparent huge page mode (`always`, `madvise` or `never`): the bracketed word of
/// `/sys/kernel/mm/transparent_hugepage/enabled`. None when the kernel has no such setting.
pub fn thp_mode() -> Option<String> {
    parse_thp_mode(&std::fs::read_to_string(THP_ENABLED).ok()?)
}

fn parse_thp_mode(text: &str) -> Option<String> {
    let start = text.find('[')? + 1;
    let len = text[start..].find(']')?;
    Some(text[start..start + len].to_string())
}

/// Whether the kernel gives huge pages to memory that asks for them.
pub fn kernel_has_huge_pages(mode: Option<&str>) -> bool {
    matches!(mode, Some("always" | "madvise"))
}

/// One mapping of `/proc/self/smaps` that may go on huge pages.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Region {
    start: usize,
    end: usize,
}

impl Region {
    /// `madvise` over the whole region with an advice about how its pages are backed; true on success
    /// (the mapping may have gone since smaps was read).
    fn advise(&self, advice: libc::c_int) -> bool {
        // SAFETY: these advices change how the kernel backs pages of a mapping this process owns (the
        // range comes from /proc/self/smaps), never their contents.
        unsafe {
            libc::madvise(
                self.start as *mut libc::c_void,
                self.end - self.start,
                advice,
            ) == 0
        }
    }

    /// The part of the region that whole huge pages cover.
    fn aligned(&self) -> Option<(usize, usize)> {
        let start = self.start.next_multiple_of(HUGE);
        let end = self.end / HUGE * HUGE;
        (end > start).then_some((start, end))
    }
}

/// The mappings worth huge pages: private, writable and anonymous (no file; the heap and named
/// anonymous mappings count), at least
/// one huge page long, and mostly in use (three quarters of it resident), so that collapsing a
/// sparsely touched mapping (a thread's stack, say) does not inflate the process.
fn regions(smaps: &str) -> Vec<Region> {
    fn flush(c: Option<(Region, usize)>, out: &mut Vec<Region>) {
        if let Some((r, anon)) = c
            && r.end - r.start >= HUGE
            && anon * 4 >= (r.end - r.start) * 3
        {
            out.push(r);
        }
    }
    let mut out = Vec::new();
    let mut current: Option<(Region, usize)> = None;
    for line in smaps.lines() {
        let mut f = line.split_whitespace();
        let first = f.next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-')
            && let (Ok(start), Ok(end)) =
                (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
        {
            flush(current.take(), &mut out);
            let perms = f.next().unwrap_or("");
            let inode = f.nth(2).unwrap_or("0");
            let path = f.next().unwrap_or("");
            let eligible = perms.starts_with("rw")
                && perms.ends_with('p')
                && inode == "0"
                && (path.is_empty() || path == "[heap]" || path.starts_with("[anon:"));
            current = eligible.then_some((Region { start, end }, 0));
        } else if first == "Anonymous:"
            && let Some((_, anon)) = current.as_mut()
        {
            *anon = f.next().and_then(|k| k.parse::<usize>().ok()).unwrap_or(0) * 1024;
        }
    }
    flush(current.take(), &mut out);
    out
}

/// What [`back_with_huge_pages`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HugePages {
    /// Mappings asked to go on huge pages.
    pub regions: usize,
    /// Bytes of the chosen mappings on huge pages once the call returned (`MADV_COLLAPSE` succeeded
    /// there: moved now, or there already).
    pub collapsed_bytes: u64,
    /// Why some or all of it did not happen (an old kernel without `MADV_COLLAPSE`, no free huge
    /// pages, a few huge pages' worth the kernel would not move); None when all of it did.
    pub note: Option<String>,
}

/// Asks the kernel to put this process's large anonymous mappings on transparent huge pages (see the
/// module's text). Call it once a model's sessions are loaded; it does nothing where the kernel gives
/// no huge pages.
pub fn back_with_huge_pages() -> HugePages {
    let mut done = HugePages::default();
    if !kernel_has_huge_pages(thp_mode().as_deref()) {
        done.note = Some("the kernel gives no transparent huge pages".into());
        return done;
    }
    let smaps = match std::fs::read_to_string("/proc/self/smaps") {
        Ok(s) => s,
        Err(e) => {
            done.note = Some(format!("cannot read /proc/self/smaps: {e}"));
            return done;
        }
    };
    // In `madvise` mode the advice is taken back once the mapping has moved (MADV_NOHUGEPAGE splits
    // nothing): a later first touch there then costs a 4 KiB page, not a 2 MiB one to clear, which
    // would land in a timed phase's tail.
    let take_back = thp_mode().as_deref() == Some("madvise");
    let mut failures = Vec::new();
    for r in regions(&smaps) {
        let Some((start, end)) = r.aligned() else {
            continue;
        };
        if !r.advise(libc::MADV_HUGEPAGE) {
            // The mapping may have gone since smaps was read.
            continue;
        }
        done.regions += 1;
        // SAFETY: as in Region::advise; the range is huge-page aligned inside the mapping.
        let collapsed =
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_COLLAPSE) };
        if collapsed == 0 {
            done.collapsed_bytes += (end - start) as u64;
            if take_back {
                r.advise(libc::MADV_NOHUGEPAGE);
            }
            continue;
        }
        // One huge page that cannot move fails the whole call: move the rest one by one.
        let mut failed = 0;
        let mut why = std::io::Error::last_os_error();
        for at in (start..end).step_by(HUGE) {
            // SAFETY: as in Region::advise, one huge page of the range.
            if unsafe { libc::madvise(at as *mut libc::c_void, HUGE, libc::MADV_COLLAPSE) } == 0 {
                done.collapsed_bytes += HUGE as u64;
            } else {
                failed += 1;
                why = std::io::Error::last_os_error();
            }
        }
        if take_back {
            r.advise(libc::MADV_NOHUGEPAGE);
        }
        if failed > 0 {
            failures.push(format!(
                "{failed} of {} huge pages at {:#x}: {why}",
                (end - start) / HUGE,
                r.start
            ));
        }
    }
    if !failures.is_empty() {
        failures.sort();
        failures.dedup();
        done.note = Some(format!(
            "MADV_COLLAPSE failed ({}); that memory stays on small pages",
            failures.join("; ")
        ));
    }
    done
}

/// Keeps this whole process on small pages, even where the kernel's mode is `always`
/// (`prctl(PR_SET_THP_DISABLE)`): what an agent with `huge_pages = false` does before it loads
/// anything, so that its runs are on small pages whatever the host's setting.
pub fn keep_small_pages() -> std::io::Result<()> {
    // SAFETY: PR_SET_THP_DISABLE takes plain integers and changes only how the kernel backs this
    // process's future page faults.
    if unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Huge pages as a run found them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryState {
    /// The kernel's transparent huge page mode; empty when it has none.
    pub thp_mode: String,
    /// Anonymous memory of this process on huge pages now (`AnonHugePages` of
    /// `/proc/self/smaps_rollup`), bytes; None where the kernel does not say.
    pub anon_huge_pages_bytes: Option<u64>,
}

impl MemoryState {
    /// The state of this process now.
    pub fn now() -> Self {
        Self {
            thp_mode: thp_mode().unwrap_or_default(),
            anon_huge_pages_bytes: std::fs::read_to_string("/proc/self/smaps_rollup")
                .ok()
                .and_then(|t| parse_anon_huge_pages(&t)),
        }
    }
}

fn parse_anon_huge_pages(smaps_rollup: &str) -> Option<u64> {
    let line = smaps_rollup
        .lines()
        .find(|l| l.starts_with("AnonHugePages:"))?;
    let kb: u64 = line
        .trim_start_matches("AnonHugePages:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernels_mode_is_the_bracketed_word() {
        assert_eq!(
            parse_thp_mode("always [madvise] never\n").as_deref(),
            Some("madvise")
        );
        assert_eq!(
            parse_thp_mode("[always] madvise never").as_deref(),
            Some("always")
        );
        assert_eq!(parse_thp_mode("always madvise never"), None);
        assert!(kernel_has_huge_pages(Some("madvise")));
        assert!(kernel_has_huge_pages(Some("always")));
        assert!(!kernel_has_huge_pages(Some("never")));
        assert!(!kernel_has_huge_pages(None));
    }

    const SMAPS: &str = "\
55f397400000-55f3b1e00000 rw-p 00000000 00:00 0                          [heap]
Size:             436224 kB
Anonymous:        436000 kB
VmFlags: rd wr mr mw me ac
7f4a18687000-7f4a219c4000 rw-p 00000000 00:00 0 
Size:             150772 kB
Anonymous:        150772 kB
VmFlags: rd wr mr mw me ac
7f4a30000000-7f4a30800000 rw-p 00000000 00:00 0 
Size:               8192 kB
Anonymous:            64 kB
VmFlags: rd wr mr mw me ac
7f4a42ed5000-7f4a44495000 r-xp 000d5000 fd:01 1234                       /usr/lib/libonnxruntime.so
Size:              22272 kB
Anonymous:             0 kB
7f4a50000000-7f4a51000000 rw-p 00001000 fd:01 1234                       /usr/lib/libonnxruntime.so
Size:              16384 kB
Anonymous:         16384 kB
7ffc1e000000-7ffc1e800000 rw-p 00000000 00:00 0                          [stack]
Size:               8192 kB
Anonymous:          8192 kB
7f4a60000000-7f4a60100000 rw-p 00000000 00:00 0 
Size:               1024 kB
Anonymous:          1024 kB
";

    #[test]
    fn only_large_busy_anonymous_mappings_are_chosen() {
        let r = regions(SMAPS);
        // The heap and the 150 MB block; not the sparse 8 MB one (a stack's worth, 64 kB touched), the
        // library's code or data, the main stack, or a mapping smaller than one huge page.
        assert_eq!(
            r,
            vec![
                Region {
                    start: 0x55f397400000,
                    end: 0x55f3b1e00000
                },
                Region {
                    start: 0x7f4a18687000,
                    end: 0x7f4a219c4000
                },
            ]
        );
        // Collapsing covers whole huge pages inside each.
        assert_eq!(r[0].aligned(), Some((0x55f397400000, 0x55f3b1e00000)));
        assert_eq!(r[1].aligned(), Some((0x7f4a18800000, 0x7f4a21800000)));
        assert_eq!(
            Region {
                start: 0x1000,
                end: 0x201000
            }
            .aligned(),
            None
        );
    }

    #[test]
    fn this_process_gets_huge_pages_where_the_kernel_gives_them() {
        // 64 MiB, every page touched: a model's weights in small.
        let weights: Vec<u8> = (0..64usize << 20).map(|i| (i / 4096) as u8).collect();
        let sum: u64 = weights.iter().map(|b| *b as u64).sum();
        let done = back_with_huge_pages();
        let state = MemoryState::now();
        if kernel_has_huge_pages(thp_mode().as_deref()) {
            assert!(done.regions >= 1, "{done:?}");
            if done.note.is_none() {
                assert!(done.collapsed_bytes >= 32 << 20, "{done:?}");
                assert!(
                    state.anon_huge_pages_bytes.unwrap() >= 32 << 20,
                    "{state:?}"
                );
            }
        } else {
            assert_eq!(done.regions, 0);
        }
        let after: u64 = weights.iter().map(|b| *b as u64).sum();
        assert_eq!(after, sum, "contents stay as they were");
    }

    #[test]
    fn huge_page_bytes_are_read_from_smaps_rollup() {
        let text =
            "Rss:  1000 kB\nAnonymous:   900 kB\nAnonHugePages:    2048 kB\nShmemHugePages: 0 kB\n";
        assert_eq!(parse_anon_huge_pages(text), Some(2048 * 1024));
        assert_eq!(parse_anon_huge_pages("Rss: 1 kB\n"), None);
    }
}
