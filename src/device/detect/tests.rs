//! The detector set's parsing, the regex path, and a detection's window,
//! deadline and memory.

use std::time::{Duration, Instant};

use super::*;

fn set(names: &str, regex: Option<&str>) -> DetectorSet {
    DetectorSet::parse(names, regex).expect("valid detectors")
}

fn found(ident: &str) -> Option<Outcome> {
    Some(Outcome::Found(Ident::new(ident).expect("valid ident")))
}

fn gave_up(why: GiveUp) -> Option<Outcome> {
    Some(Outcome::GaveUp(why))
}

#[test]
fn auto_off_and_lists_parse_in_any_case() {
    assert_eq!(
        set("auto", None).to_string(),
        "teltonika, gt06, h02, queclink, coban, meitrack"
    );
    assert_eq!(
        set(" AUTO ", None).to_string(),
        set("auto", None).to_string()
    );
    assert_eq!(set("off", None).to_string(), "off");
    assert!(set("Off", None).is_off());
    assert_eq!(
        set("meitrack, Teltonika,gt06,gt06", None).to_string(),
        "teltonika, gt06, meitrack"
    );
    assert_eq!(set("off", Some(r"id=(\d+);")).to_string(), "regex");
    assert!(!set("off", Some(r"id=(\d+);")).is_off());
    assert_eq!(set("h02", Some(r"id=(\d+);")).to_string(), "regex, h02");
}

#[test]
fn an_unknown_detector_name_is_refused_saying_what_is_expected() {
    for (names, bad) in [
        ("tk103", "tk103"),
        ("gt06,,h02", ""),
        ("auto,gt06", "auto"),
        ("", ""),
    ] {
        let error = DetectorSet::parse(names, None).expect_err(names);
        assert_eq!(
            error,
            DetectorSetError::UnknownDetector { name: bad.into() }
        );
        assert_eq!(error.variable(), "PROXY_DEVICE_IDENT");
        assert_eq!(
            error.to_string(),
            format!(
                "auto, off or a comma list of teltonika, gt06, h02, queclink, coban, meitrack; {bad:?} is not one"
            )
        );
    }
}

#[test]
fn a_regex_must_compile_and_have_exactly_one_capture_group() {
    let cases = [
        ("(abc", "it does not compile: unclosed group"),
        (r"imei:\d+", "this one has 0"),
        (r"(imei):(\d+)", "this one has 2"),
    ];
    for (pattern, reason) in cases {
        let error = DetectorSet::parse("auto", Some(pattern)).expect_err(pattern);
        assert_eq!(error.variable(), "PROXY_DEVICE_IDENT_REGEX");
        let text = error.to_string();
        assert!(text.starts_with("a regular expression with exactly one capture group; "));
        assert!(text.contains(reason), "{text}");
        assert!(!text.contains('\n'), "one line: {text}");
    }
    assert!(DetectorSet::parse("auto", Some(r"(?:imei|id):(\d+),")).is_ok());
}

/// The one outcome of a detection fed `pieces` as successive reads.
fn outcome_of(set: &DetectorSet, pieces: &[&[u8]]) -> Option<Outcome> {
    let now = Instant::now();
    let mut detection = Detection::new(now);
    let outcome = pieces.iter().find_map(|p| detection.feed(set, p, now));
    assert!(!detection.is_pending() || outcome.is_none());
    outcome
}

#[test]
fn the_regex_group_is_the_ident_however_the_bytes_are_split() {
    let set = set("off", Some(r"ID=(\w+);"));
    let packet = b"HELLO ID=ab12_Z; BYE";
    for at in 0..=packet.len() {
        let (head, tail) = packet.split_at(at);
        assert_eq!(
            outcome_of(&set, &[head, tail]),
            found("ab12_Z"),
            "split at {at}"
        );
    }
}

#[test]
fn the_regex_is_tried_before_the_built_in_detectors() {
    let set = set("auto", Some(r"imei:(\d{3})"));
    let login = b"##,imei:359586015829802,A;";
    assert_eq!(outcome_of(&set, &[login]), found("359"));
}

#[test]
fn a_regex_group_at_the_end_of_what_arrived_waits_for_one_more_byte() {
    let set = set("off", Some(r"^(\d+)"));
    let now = Instant::now();
    let mut detection = Detection::new(now);
    assert_eq!(detection.feed(&set, b"3595860", now), None);
    assert_eq!(detection.feed(&set, b"15829802", now), None);
    assert_eq!(detection.feed(&set, b"\r\n", now), found("359586015829802"));
}

#[test]
fn a_regex_group_at_the_end_counts_once_time_is_up() {
    let set = set("off", Some(r"^(\d{15})"));
    let now = Instant::now();
    let mut detection = Detection::new(now);
    assert_eq!(detection.feed(&set, b"359586015829802", now), None);
    let deadline = detection.deadline().expect("pending");
    assert_eq!(deadline, now + DETECTION_TIME);
    assert_eq!(
        detection.expire(&set, deadline - Duration::from_millis(1)),
        None
    );
    assert_eq!(detection.expire(&set, deadline), found("359586015829802"));
    assert_eq!(detection.deadline(), None);
}

#[test]
fn a_regex_group_that_is_no_valid_ident_is_no_match() {
    let set = set("off", Some(r"name=([^;]*);"));
    assert_eq!(
        outcome_of(&set, &[b"name=a b; name=; name=ok;"]),
        found("ok")
    );
    assert_eq!(outcome_of(&set, &[b"name=a b; x"]), None);
}

#[test]
fn bytes_no_detector_can_match_end_detection_at_once() {
    let http = b"GET / HTTP/1.1\r\n";
    assert_eq!(
        outcome_of(&set("auto", None), &[http]),
        gave_up(GiveUp::NoMatchPossible)
    );
    assert_eq!(
        outcome_of(&set("off", None), &[b"x"]),
        gave_up(GiveUp::NoMatchPossible)
    );
    // A regex could still match later bytes.
    assert_eq!(outcome_of(&set("auto", Some(r"id=(\d+);")), &[http]), None);
}

#[test]
fn detection_gives_up_after_1_kib_without_a_match_keeping_no_more() {
    let set = set("auto", None);
    let keep_alives = vec![0xFF; 2000];
    assert_eq!(
        outcome_of(&set, &[&keep_alives]),
        gave_up(GiveUp::WindowFull)
    );
    let now = Instant::now();
    let mut detection = Detection::new(now);
    for count in 1..=WINDOW_BYTES {
        let outcome = detection.feed(&set, &[0xFF], now);
        assert!(detection.held_bytes() <= WINDOW_BYTES);
        match count {
            WINDOW_BYTES => assert_eq!(outcome, gave_up(GiveUp::WindowFull)),
            _ => assert_eq!(outcome, None, "after {count} bytes"),
        }
    }
    assert_eq!(detection.held_bytes(), 0);
    assert_eq!(detection.feed(&set, b"\x00\x011", now), None, "ended");
}

#[test]
fn a_match_in_the_last_bytes_of_the_window_counts_and_later_bytes_do_not() {
    let set = set("teltonika", None);
    let mut stream = vec![0xFF; WINDOW_BYTES - 3];
    stream.extend_from_slice(b"\x00\x017");
    assert_eq!(
        outcome_of(&set, &[&stream[..1000], &stream[1000..]]),
        found("7")
    );
    let late = [&[0xFF; WINDOW_BYTES - 2][..], b"\x00\x017"].concat();
    assert_eq!(
        outcome_of(&set, &[&late[..10], &late[10..]]),
        gave_up(GiveUp::WindowFull)
    );
}

#[test]
fn bytes_after_the_deadline_do_not_count() {
    let set = set("auto", None);
    let accepted = Instant::now();
    let mut detection = Detection::new(accepted);
    assert_eq!(detection.feed(&set, b"\x00\x0F3563", accepted), None);
    assert!(detection.held_bytes() > 0);
    let late = accepted + DETECTION_TIME;
    let outcome = detection.feed(&set, b"07042441013", late);
    assert_eq!(outcome, gave_up(GiveUp::TimedOut));
    assert_eq!(detection.held_bytes(), 0);
    assert_eq!(detection.expire(&set, late), None, "ends once");
}

#[test]
fn a_datagram_is_read_whole_with_every_detector() {
    let h02 = b"*HQ,865205030001234,V1,121532,A#";
    let auto = set("auto", None);
    assert_eq!(
        detect_datagram(&auto, h02).map(|i| i.to_string()),
        Some("865205030001234".into())
    );
    assert_eq!(
        detect_datagram(&auto, b"*HQ,865205030001234"),
        None,
        "no comma"
    );
    let regex = set("off", Some(r"^(\d{15})"));
    let ident = detect_datagram(&regex, b"359586015829802");
    assert_eq!(ident.map(|i| i.to_string()), Some("359586015829802".into()));
    assert_eq!(detect_datagram(&set("off", None), h02), None);
}

#[test]
fn one_line_keeps_the_reason_of_a_regex_syntax_error() {
    let message = "regex parse error:\n    (abc\n    ^\nerror: unclosed group";
    assert_eq!(one_line(message), "unclosed group");
    assert_eq!(
        one_line("compiled regex\nexceeds  the limit"),
        "compiled regex exceeds the limit"
    );
}

#[test]
fn a_detection_is_small_until_bytes_arrive() {
    let size = size_of::<Detection>();
    assert!(size <= 40, "{size} bytes");
    assert_eq!(Detection::new(Instant::now()).held_bytes(), 0);
}

#[test]
fn the_end_of_stream_ends_detection_with_a_last_look_for_the_regex() {
    let now = Instant::now();
    let regex = set("off", Some(r"id=(\d+)"));
    let mut detection = Detection::new(now);
    assert_eq!(detection.feed(&regex, b"id=42", now), None, "may go on");
    assert_eq!(detection.finish(&regex), found("42"));
    assert_eq!(detection.finish(&regex), None, "ends once");

    let auto = set("auto", None);
    let mut detection = Detection::new(now);
    assert_eq!(detection.feed(&auto, b"\x00\x0F3563", now), None);
    assert_eq!(detection.finish(&auto), gave_up(GiveUp::StreamEnded));
    assert_eq!(detection.held_bytes(), 0);
}
