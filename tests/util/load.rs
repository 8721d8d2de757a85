//! Steady load: many devices, each sending a random packet at a fixed pace,
//! driven by a few threads; what each device sent is recorded with the time
//! of every packet, so a test can say what must have reached the file.
//!
//! Bounded: every thread stops when told, at its time limit, or (for one
//! device) at the first failed send, as when the daemon was killed.

use std::ops::RangeInclusive;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, RngExt, SeedableRng};

use super::{Device, End, secs};

/// What one device sent.
pub struct Sent {
    pub device: Device,
    /// Its `peer` as the daemon records it.
    pub peer: String,
    pub bytes: Vec<u8>,
    /// After each packet: when it was sent and the bytes sent so far.
    pub marks: Vec<(Instant, usize)>,
    /// The error that ended its sending, if one did.
    pub failed: Option<String>,
}

impl Sent {
    /// Bytes whose send had returned before `at`.
    pub fn sent_before(&self, at: Instant) -> usize {
        self.marks
            .iter()
            .take_while(|(when, _)| *when < at)
            .last()
            .map_or(0, |(_, total)| *total)
    }
}

/// The pace and shape of a load.
#[derive(Clone)]
pub struct Pace {
    /// Each device sends one packet this often.
    pub every: Duration,
    /// Packet sizes, uniformly random.
    pub sizes: RangeInclusive<usize>,
    /// Threads that share the devices.
    pub threads: usize,
    /// No thread runs longer than this.
    pub limit: Duration,
}

impl Pace {
    /// A steady trickle of small packets, one thread: enough to keep the
    /// writer busy (or stuck on a full disk) for up to 30 s.
    pub fn trickle() -> Pace {
        Pace {
            every: Duration::from_millis(20),
            sizes: 100..=1000,
            threads: 1,
            limit: Duration::from_secs(30),
        }
    }
}

/// A running load; [`Load::finish`] stops it and hands the devices back.
pub struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Vec<Sent>>>,
}

impl Load {
    /// Starts sending from `devices`; `seed` makes the bytes reproducible.
    pub fn start(devices: Vec<Device>, pace: &Pace, seed: u64) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let per_thread = devices.len().div_ceil(pace.threads.max(1)).max(1);
        let mut devices = devices.into_iter();
        let mut threads = Vec::new();
        for index in 0.. {
            let group: Vec<Device> = devices.by_ref().take(per_thread).collect();
            if group.is_empty() {
                break;
            }
            let stop = Arc::clone(&stop);
            let pace = pace.clone();
            let rng = SmallRng::seed_from_u64(seed.wrapping_add(index));
            threads.push(thread::spawn(move || send_paced(group, &pace, rng, &stop)));
        }
        Load { stop, threads }
    }

    /// Stops every thread and returns what each device sent, in the order
    /// the devices were given.
    pub fn finish(self) -> Vec<Sent> {
        self.stop.store(true, Ordering::SeqCst);
        self.threads
            .into_iter()
            .flat_map(|thread| thread.join().expect("load thread"))
            .collect()
    }
}

fn send_paced(
    devices: Vec<Device>,
    pace: &Pace,
    mut rng: SmallRng,
    stop: &AtomicBool,
) -> Vec<Sent> {
    let mut sent: Vec<Sent> = devices
        .into_iter()
        .map(|device| Sent {
            peer: device.name().to_string(),
            device,
            bytes: Vec::new(),
            marks: Vec::new(),
            failed: None,
        })
        .collect();
    let start = Instant::now();
    let rounds = pace.limit.as_millis() / pace.every.as_millis().max(1) + 1;
    for round in 1..=rounds {
        if stop.load(Ordering::SeqCst) || start.elapsed() >= pace.limit {
            break;
        }
        for one in sent.iter_mut().filter(|s| s.failed.is_none()) {
            let mut packet = vec![0; rng.random_range(pace.sizes.clone())];
            rng.fill_bytes(&mut packet);
            match std::io::Write::write_all(one.device.stream(), &packet) {
                Ok(()) => {
                    one.bytes.extend_from_slice(&packet);
                    one.marks.push((Instant::now(), one.bytes.len()));
                }
                Err(e) => one.failed = Some(e.to_string()),
            }
        }
        let next = start + pace.every * u32::try_from(round).unwrap_or(u32::MAX);
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
    }
    sent
}

/// Ends every device's stream and waits for the daemon to close it.
pub fn close_all(sent: &mut [Sent]) {
    for one in sent.iter_mut() {
        one.device.shutdown_write();
    }
    for one in sent.iter_mut() {
        let end = one.device.read_until_end(secs(15)).end;
        assert_eq!(end, End::Eof, "device {} after its end of stream", one.peer);
    }
}
