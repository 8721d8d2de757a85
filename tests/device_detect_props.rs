//! Device detection under any input: no input (random bytes, random splits
//! into reads) makes a detector panic or keep more than 1 KiB, and a
//! detection's outcome is the same however the input is split. Also what
//! detection and a device list cost in memory, counted by an allocator
//! that tallies this thread's allocations.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::Write;
use std::time::Instant;

use proptest::prelude::*;
use proxy_channel::device::{
    Detection, DetectorSet, DeviceList, Outcome, WINDOW_BYTES, detect_datagram,
};

/// Counts the bytes and allocations of the current thread (tests run in
/// parallel threads, so a global count would mix them).
struct CountingAllocator;

thread_local! {
    static LIVE_BYTES: Cell<isize> = const { Cell::new(0) };
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

fn tally(bytes: isize, allocations: usize) {
    // `try_with`: nothing to count while the thread is being torn down.
    let _ = LIVE_BYTES.try_with(|live| live.set(live.get() + bytes));
    let _ = ALLOCATIONS.try_with(|count| count.set(count.get() + allocations));
}

unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let pointer = unsafe { System.alloc(layout) };
        if !pointer.is_null() {
            tally(layout.size() as isize, 1);
        }
        pointer
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let pointer = unsafe { System.alloc_zeroed(layout) };
        if !pointer.is_null() {
            tally(layout.size() as isize, 1);
        }
        pointer
    }

    unsafe fn dealloc(&self, pointer: *mut u8, layout: Layout) {
        unsafe { System.dealloc(pointer, layout) };
        tally(-(layout.size() as isize), 0);
    }

    unsafe fn realloc(&self, pointer: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let moved = unsafe { System.realloc(pointer, layout, new_size) };
        if !moved.is_null() {
            tally(new_size as isize - layout.size() as isize, 1);
        }
        moved
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// What `work` left allocated on this thread, and how many allocations it
/// made.
fn allocations_of<T>(work: impl FnOnce() -> T) -> (T, isize, usize) {
    let (live, count) = (LIVE_BYTES.get(), ALLOCATIONS.get());
    let result = work();
    (result, LIVE_BYTES.get() - live, ALLOCATIONS.get() - count)
}

/// Built-ins alone, the regex alone, both, and a regex matching any byte.
fn detector_sets() -> [DetectorSet; 4] {
    let parse = |names, regex| DetectorSet::parse(names, regex).expect("valid detectors");
    [
        parse("auto", None),
        parse("off", Some(r"imei=(\d+);")),
        parse("auto", Some(r"imei=(\d+);")),
        parse("off", Some(r"(?-u)(.)")),
    ]
}

/// `bytes` cut at `cuts` (positions, any order, repeats allowed) into reads.
fn pieces<'a>(bytes: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut cuts: Vec<usize> = cuts.iter().map(|cut| cut % (bytes.len() + 1)).collect();
    cuts.sort_unstable();
    let mut pieces = Vec::new();
    let mut start = 0;
    for cut in cuts.into_iter().chain([bytes.len()]) {
        pieces.push(&bytes[start..cut]);
        start = cut;
    }
    pieces
}

/// Feeds `reads` in turn, checking the bounds after each; the outcome.
fn detect(set: &DetectorSet, reads: &[&[u8]]) -> Option<Outcome> {
    let now = Instant::now();
    let mut detection = Detection::new(now);
    let mut outcome = None;
    for read in reads {
        let ended = detection.feed(set, read, now);
        assert!(
            detection.held_bytes() <= WINDOW_BYTES,
            "{} held",
            detection.held_bytes()
        );
        if ended.is_some() {
            assert!(outcome.is_none(), "a detection ends once");
            assert_eq!(detection.held_bytes(), 0, "freed when ended");
            outcome = ended;
        }
    }
    outcome
}

/// The start of a stream that some detector (or the test regex) could
/// match, for family `family` and an ID of digits.
fn frame(family: u8, id: &str) -> Vec<u8> {
    match family % 7 {
        0 => {
            let length = u16::try_from(id.len()).expect("short ID");
            [&[0xFF][..], &length.to_be_bytes(), id.as_bytes()].concat()
        }
        1 => {
            let digits = format!("{id:0>16}");
            let bcd = digits
                .as_bytes()
                .chunks(2)
                .map(|p| (p[0] - b'0') << 4 | (p[1] - b'0'));
            [&[0x78, 0x78, 0x0D, 0x01][..], &bcd.collect::<Vec<u8>>()].concat()
        }
        2 => format!("*hQ,{id},V1,#").into_bytes(),
        3 => format!("+RESP:GTFRI,060228,{id},,0$").into_bytes(),
        4 => format!("##,imei:{id},A;").into_bytes(),
        5 => format!("$$A138,{id},AAA,").into_bytes(),
        _ => format!("x imei={id};").into_bytes(),
    }
}

/// A frame (maybe with one byte changed), then any bytes.
fn near_frames() -> impl Strategy<Value = Vec<u8>> {
    let id = "[0-9]{1,16}";
    let change = proptest::option::of((any::<prop::sample::Index>(), any::<u8>()));
    let tail = prop::collection::vec(any::<u8>(), 0..64);
    (any::<u8>(), id, change, tail).prop_map(|(family, id, change, tail)| {
        let mut bytes = frame(family, &id);
        if let Some((index, byte)) = change {
            let at = index.index(bytes.len());
            bytes[at] = byte;
        }
        bytes.extend_from_slice(&tail);
        bytes
    })
}

fn any_input() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..3000),
        prop::collection::vec(
            prop::sample::select(b"\xFF\x00\x0F79,*+$#imeHQ:".to_vec()),
            0..1500
        ),
        near_frames(),
    ]
}

proptest! {
    #[test]
    fn no_input_panics_or_keeps_more_than_1_kib(
        input in any_input(),
        cuts in prop::collection::vec(any::<usize>(), 0..40),
    ) {
        let reads = pieces(&input, &cuts);
        for set in &detector_sets() {
            detect(set, &reads);
            let _ = detect_datagram(set, &input);
        }
    }

    #[test]
    fn the_outcome_is_the_same_however_the_input_is_split(
        input in any_input(),
        cuts in prop::collection::vec(any::<usize>(), 1..40),
    ) {
        // The regex ends with `;`, so a read boundary cannot cut its ID
        // short. (Regex and built-ins together are not split-proof: the
        // first to match in time wins, and a regex match further on in
        // the window wins when the bytes come in one read.)
        for set in &detector_sets()[..2] {
            let whole = detect(set, &[&input]);
            let split = detect(set, &pieces(&input, &cuts));
            prop_assert_eq!(whole, split);
        }
    }
}

#[test]
fn real_frames_are_found_by_the_split_property_generator() {
    let set = &detector_sets()[2];
    for family in 0..7 {
        let outcome = detect(set, &[&frame(family, "359586015829802")]);
        let ident = match outcome {
            Some(Outcome::Found(ident)) => ident.to_string(),
            other => panic!("family {family}: {other:?}"),
        };
        assert_eq!(ident, "359586015829802", "family {family}");
    }
}

#[test]
fn a_login_in_one_read_allocates_only_its_ident_and_nothing_after() {
    let set = &detector_sets()[0];
    let now = Instant::now();
    let mut detection = Detection::new(now);
    let (outcome, _, allocations) =
        allocations_of(|| detection.feed(set, b"\x00\x0F356307042441013", now));
    assert!(matches!(outcome, Some(Outcome::Found(_))));
    assert_eq!(allocations, 1, "the ident's text only");
    let ((), live, allocations) = allocations_of(|| {
        for _ in 0..1000 {
            assert_eq!(detection.feed(set, b"\x00\x08data", now), None);
        }
    });
    assert_eq!((live, allocations), (0, 0));
}

#[test]
fn a_pending_detection_holds_its_bytes_and_frees_them_when_it_ends() {
    let set = &detector_sets()[0];
    let now = Instant::now();
    let mut detection = Detection::new(now);
    assert_eq!(detection.held_bytes(), 0, "nothing before the first read");
    assert_eq!(detection.feed(set, b"*HQ,8652", now), None);
    assert_eq!(detection.held_bytes(), 64);
    let (outcome, live, _) = allocations_of(|| detection.feed(set, b" ", now));
    assert!(matches!(outcome, Some(Outcome::GaveUp(_))), "{outcome:?}");
    assert_eq!(live, -64, "the window is given back");
}

#[test]
fn a_list_of_100000_imeis_costs_little_memory() {
    let mut file = tempfile::NamedTempFile::new().expect("temp file");
    let imeis: Vec<String> = (0..100_000u64)
        .map(|n| format!("{}", 359_586_015_000_000 + n * 7))
        .collect();
    file.write_all(imeis.join("\n").as_bytes()).expect("write");
    let (list, live, _) = allocations_of(|| DeviceList::load(file.path()));
    let list = list.expect("valid list");
    assert_eq!(list.len(), 100_000);
    let per_ident = live as f64 / 100_000.0;
    eprintln!("device list: {live} bytes for 100000 IMEIs, {per_ident:.1} bytes each");
    assert!(per_ident < 48.0, "{per_ident:.1} bytes per ident");
    assert!(imeis.iter().all(|imei| list.contains(imei)));
    assert!(!list.contains("359586015000001"));
}
