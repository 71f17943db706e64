//! When to spin before sleeping: the waiting policy both sides of the device-model protocol
//! use (the multiplexer waiting for an answer in [`super::remote`], a device model waiting
//! for its next request in [`super::client`]).
//!
//! Spinning pays only while the peer is running on another CPU and answers within about a
//! round trip. When the CPUs are oversubscribed, a spinning side burns the CPU time the peer
//! it waits for needs (the scheduler gives both a fair share, and the spinner's share goes
//! to polling memory nobody writes), so a fixed spin turns a 2x slowdown into 5x and worse.
//! The policy, one [`SpinPolicy`] per kind of peer state (see [`Spinner`]):
//!
//! - **Bounded by the recent round trip.** The budget is [`RTT_FACTOR`] times an
//!   exponentially weighted mean of the waits that ended while spinning, never less than
//!   [`MIN_SPIN`] (what a sleep and a wake-up cost at best, so a spin never loses more than
//!   that) and never more than the configured maximum.
//! - **... or by what sleeping costs, for answers.** The multiplexer waits for an answer
//!   that is sure to come (the device model is serving the request): spinning until it comes
//!   is worth up to what a sleep would cost, the mean time to an answer in the waits that
//!   slept (on the VM in `docs/performance.md` a wake-up across CPUs is 30-80 µs, while a
//!   back-to-back answer takes ~2 µs). Without this floor, one slow answer starts a cascade:
//!   the waiter sleeps, its own wake-up makes the peer's next wait long, the peer sleeps,
//!   and every round trip pays two wake-ups (measured: 62 µs instead of 1.8 µs). A device
//!   model's wait for the next request is speculative (the guest may not send one for a
//!   long time), so it has no such floor.
//! - **Backing off when it fails.** Each wait that spun its whole budget and still had to
//!   sleep halves the budget; [`OFF_AFTER`] such failures in a row turn spinning off. Any
//!   wait answered while spinning restores the full budget.
//! - **Probing.** While off, one wait in [`PROBE_EVERY`] spins the full budget again, so
//!   spinning comes back when the load goes away.
//! - **By what the peer is doing.** A peer that said it was polling is on a CPU now and
//!   answers in about a round trip; a peer that had to be woken answers only after the
//!   scheduler runs it, which on an oversubscribed machine may need *this* CPU. The two
//!   cases are learned separately ([`Spinner`]), so a woken peer that keeps needing our CPU
//!   turns spinning off for woken peers only.
//! - **Never on one CPU**: the caller's maximum is already zero there
//!   ([`super::remote::spin_budget`]).
//!
//! The policy only chooses how long to spin. The rules that make a skipped eventfd safe (set
//! the flag, spin; clear the flag, fence, look again, then sleep) are the callers', in
//! [`super::notify`], and hold for every budget, zero included.
//!
//! `IOREQ_MUX_SPIN=fixed` in the environment makes the defaults spin a fixed time again (the
//! policy before this module, for comparison: `docs/performance.md`).

use std::time::Duration;

/// The environment variable that selects [`SpinMode::Fixed`] for the defaults.
pub const SPIN_ENV: &str = "IOREQ_MUX_SPIN";

/// Weight of a new sample in the mean, as a shift: 1/8, the smoothed round-trip time's gain
/// in TCP (RFC 6298), which follows a change within ~8 samples without jumping on one.
pub const EWMA_SHIFT: u32 = 3;

/// Spin up to this many times the recent answer time: an answer that takes longer is in the
/// tail (the peer was preempted, or is doing something slow), where sleeping costs less
/// than more spinning.
pub const RTT_FACTOR: u64 = 2;

/// The shortest full budget: the one-CPU eventfd ping-pong floor `ioreq-mux bench` measures
/// (5.4-5.9 µs, `docs/performance.md` section 3), i.e. what sleeping and being woken cost
/// at best. Spinning for as long as blocking costs is the classic competitive choice: it is
/// never worse than twice the better of the two.
pub const MIN_SPIN: Duration = Duration::from_micros(5);

/// Failed spins in a row that turn spinning off. Each halves the budget first, so the four
/// cost less than two full budgets together; the last one is a sixteenth of [`MIN_SPIN`]
/// (~0.3 µs), about one busy-polling round trip, below which spinning cannot pay.
pub const OFF_AFTER: u32 = 4;

/// While spinning is off, one wait in this many spins the full budget to see whether it
/// pays again. A probe costs one budget (a few µs); one in 32 waits is a few percent of
/// even the cheapest wake-up, and spinning returns within 32 waits of the load going away.
pub const PROBE_EVERY: u32 = 32;

/// How a side spins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SpinMode {
    /// Spin as long as it pays (this module), up to the configured maximum.
    #[default]
    Adaptive,
    /// Always spin the configured time (the policy before this module).
    Fixed,
}

impl SpinMode {
    /// [`SpinMode::Fixed`] when `IOREQ_MUX_SPIN=fixed`, else adaptive.
    pub fn from_env() -> Self {
        match std::env::var(SPIN_ENV) {
            Ok(v) if v.eq_ignore_ascii_case("fixed") => SpinMode::Fixed,
            _ => SpinMode::Adaptive,
        }
    }
}

/// How a wait that may have spun ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// What was waited for came while spinning, this long after the wait began.
    Spun(Duration),
    /// It came only after sleeping, this long after the wait began.
    Slept(Duration),
}

/// What is waited for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Awaited {
    /// The answer to a request (sure to come): the budget is at least what a sleep costs.
    Answer,
    /// The next request (it may not come for a long time): spin only about a round trip.
    Request,
}

/// The budget of one kind of wait (pure: fed outcomes, it says how long to spin next).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpinPolicy {
    mode: SpinMode,
    awaited: Awaited,
    max_ns: u64,
    /// Mean time to an answer seen while spinning; `None` before the first.
    mean_ns: Option<u64>,
    /// Mean time to an answer in the waits that slept; `None` before the first.
    slept_ns: Option<u64>,
    /// Failed spins in a row (at [`OFF_AFTER`]: off).
    failures: u32,
    /// Waits since spinning went off or was last probed.
    waits_off: u32,
}

fn ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl SpinPolicy {
    /// Spins at most `max` (zero: never) waiting for `awaited`.
    pub fn new(max: Duration, mode: SpinMode, awaited: Awaited) -> Self {
        SpinPolicy {
            mode,
            awaited,
            max_ns: ns(max),
            mean_ns: None,
            slept_ns: None,
            failures: 0,
            waits_off: 0,
        }
    }

    /// The budget when spinning is not backed off: twice the mean answer time, at least
    /// [`MIN_SPIN`] (and, for answers, at least the mean cost of a sleep), at most the
    /// maximum; the maximum itself before anything was learned.
    pub fn full(&self) -> Duration {
        let want = match (self.mode, self.mean_ns) {
            (SpinMode::Fixed, _) | (_, None) => self.max_ns,
            (SpinMode::Adaptive, Some(m)) => {
                let rtt = m.saturating_mul(RTT_FACTOR).max(ns(MIN_SPIN));
                match (self.awaited, self.slept_ns) {
                    (Awaited::Answer, Some(s)) => rtt.max(s),
                    _ => rtt,
                }
            }
        };
        Duration::from_nanos(want.min(self.max_ns))
    }

    /// Whether spinning is off (failed [`OFF_AFTER`] times in a row).
    pub fn is_off(&self) -> bool {
        self.failures >= OFF_AFTER
    }

    /// How long the next wait may spin. While off this is zero, except for one wait in
    /// [`PROBE_EVERY`], which gets the full budget.
    pub fn budget(&mut self) -> Duration {
        if self.mode == SpinMode::Fixed {
            return Duration::from_nanos(self.max_ns);
        }
        if self.is_off() {
            self.waits_off += 1;
            if self.waits_off < PROBE_EVERY {
                return Duration::ZERO;
            }
            self.waits_off = 0;
            return self.full();
        }
        self.full() / (1 << self.failures)
    }

    /// Learns from a wait that was given `budget` (by [`Self::budget`]).
    pub fn record(&mut self, budget: Duration, outcome: Outcome) {
        if self.mode == SpinMode::Fixed || budget.is_zero() {
            return; // nothing was tried, nothing is learned
        }
        match outcome {
            Outcome::Spun(took) => {
                self.mean_ns = Some(ewma(self.mean_ns, ns(took)));
                self.failures = 0;
                self.waits_off = 0;
            }
            Outcome::Slept(took) => {
                self.slept_ns = Some(ewma(self.slept_ns, ns(took)));
                self.failures = (self.failures + 1).min(OFF_AFTER);
            }
        }
    }
}

/// The mean `m` moved by 1/8 of the way to the sample `t` (the first sample is the mean).
fn ewma(m: Option<u64>, t: u64) -> u64 {
    match m {
        None => t,
        Some(m) if t >= m => m + ((t - m) >> EWMA_SHIFT),
        Some(m) => m - ((m - t) >> EWMA_SHIFT),
    }
}

/// What the peer was doing when this side began to wait, as the notification page says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// It said it was polling: it is on a CPU now.
    Polling,
    /// It had to be rung: it runs only once woken and scheduled.
    Rung,
}

/// One wait under way: the budget it was given and for which kind of peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    pub peer: Peer,
    pub budget: Duration,
}

/// The waiting policy of one side: a [`SpinPolicy`] per [`Peer`] state, since a peer that
/// must be woken first answers on another time scale (and, under oversubscription, may need
/// this very CPU to run).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spinner {
    polling: SpinPolicy,
    rung: SpinPolicy,
}

impl Spinner {
    pub fn new(max: Duration, mode: SpinMode, awaited: Awaited) -> Self {
        Spinner {
            polling: SpinPolicy::new(max, mode, awaited),
            rung: SpinPolicy::new(max, mode, awaited),
        }
    }

    fn of(&mut self, peer: Peer) -> &mut SpinPolicy {
        match peer {
            Peer::Polling => &mut self.polling,
            Peer::Rung => &mut self.rung,
        }
    }

    /// Begins a wait on a peer in state `peer`.
    pub fn start(&mut self, peer: Peer) -> Ticket {
        Ticket {
            peer,
            budget: self.of(peer).budget(),
        }
    }

    /// Ends the wait `t` with `outcome`.
    pub fn finish(&mut self, t: Ticket, outcome: Outcome) {
        self.of(t.peer).record(t.budget, outcome);
    }

    /// The policy for a peer in state `peer` (for tests and diagnostics).
    pub fn policy(&self, peer: Peer) -> &SpinPolicy {
        match peer {
            Peer::Polling => &self.polling,
            Peer::Rung => &self.rung,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    fn adaptive(max_us: u64) -> SpinPolicy {
        SpinPolicy::new(US * max_us as u32, SpinMode::Adaptive, Awaited::Request)
    }

    fn answers(max_us: u64) -> SpinPolicy {
        SpinPolicy::new(US * max_us as u32, SpinMode::Adaptive, Awaited::Answer)
    }

    /// Feeds `n` waits that were answered while spinning, `took` after they began.
    fn spin_ok(p: &mut SpinPolicy, took: Duration, n: usize) {
        for _ in 0..n {
            let b = p.budget();
            p.record(b, Outcome::Spun(took.min(b)));
        }
    }

    fn spin_fail(p: &mut SpinPolicy, n: usize) {
        for _ in 0..n {
            let b = p.budget();
            p.record(b, Outcome::Slept(b));
        }
    }

    #[test]
    fn starts_at_the_maximum_and_never_exceeds_it() {
        let mut p = adaptive(50);
        assert_eq!(p.budget(), US * 50);
        spin_ok(&mut p, US * 400, 100); // answers slower than the maximum allows
        assert_eq!(p.budget(), US * 50);
        assert_eq!(adaptive(0).budget(), Duration::ZERO);
    }

    #[test]
    fn follows_twice_the_recent_round_trip() {
        let mut p = adaptive(500);
        spin_ok(&mut p, US * 20, 1);
        assert_eq!(p.budget(), US * 40, "the first sample is the mean");
        spin_ok(&mut p, US * 10, 64);
        let b = p.budget();
        assert!(b >= US * 20 && b <= US * 21, "{b:?}");
    }

    #[test]
    fn never_below_the_cost_of_a_sleep() {
        let mut p = adaptive(50);
        spin_ok(&mut p, Duration::from_nanos(300), 100);
        assert_eq!(p.budget(), MIN_SPIN);
        // ... unless the maximum is lower.
        let mut q = adaptive(2);
        spin_ok(&mut q, Duration::from_nanos(300), 100);
        assert_eq!(q.budget(), US * 2);
    }

    #[test]
    fn failures_halve_then_turn_spinning_off() {
        let mut p = adaptive(50);
        spin_ok(&mut p, US * 10, 50);
        let full = p.budget();
        let mut seen = vec![];
        for _ in 0..OFF_AFTER {
            let b = p.budget();
            seen.push(b);
            p.record(b, Outcome::Slept(b));
        }
        assert_eq!(seen, [full, full / 2, full / 4, full / 8]);
        assert!(p.is_off());
        assert_eq!(p.budget(), Duration::ZERO);
    }

    #[test]
    fn one_success_restores_the_full_budget() {
        let mut p = adaptive(50);
        spin_ok(&mut p, US * 10, 50);
        let full = p.budget();
        spin_fail(&mut p, 2);
        assert_eq!(p.budget(), full / 4);
        spin_ok(&mut p, US * 2, 1);
        assert!(p.budget() > full / 2, "{:?}", p.budget());
    }

    #[test]
    fn off_probes_now_and_then_and_recovers() {
        let mut p = adaptive(50);
        spin_ok(&mut p, US * 10, 50);
        spin_fail(&mut p, OFF_AFTER as usize);
        // While off: zero budgets, then one probe per PROBE_EVERY waits.
        let budgets: Vec<Duration> = (0..3 * PROBE_EVERY)
            .map(|_| {
                let b = p.budget();
                p.record(b, Outcome::Slept(b)); // the load is still there
                b
            })
            .collect();
        let probes = budgets.iter().filter(|b| !b.is_zero()).count();
        assert_eq!(probes, 3);
        assert!(p.is_off());
        // The load goes away: the next probe succeeds and spinning is back at once.
        let mut waits = 0;
        loop {
            waits += 1;
            let b = p.budget();
            if b.is_zero() {
                p.record(b, Outcome::Slept(b));
                continue;
            }
            p.record(b, Outcome::Spun(US));
            break;
        }
        assert!(waits <= PROBE_EVERY);
        assert!(!p.is_off());
        assert!(p.budget() >= MIN_SPIN);
    }

    #[test]
    fn zero_budget_waits_teach_nothing() {
        let mut p = adaptive(50);
        let before = p.clone();
        p.record(Duration::ZERO, Outcome::Slept(US));
        p.record(Duration::ZERO, Outcome::Spun(US));
        assert_eq!(p, before);
    }

    #[test]
    fn fixed_always_spins_the_maximum() {
        let mut p = SpinPolicy::new(US * 50, SpinMode::Fixed, Awaited::Answer);
        spin_fail(&mut p, 100);
        assert_eq!(p.budget(), US * 50);
        spin_ok(&mut p, Duration::from_nanos(300), 100);
        assert_eq!(p.budget(), US * 50);
    }

    #[test]
    fn peers_polling_and_rung_are_learned_apart() {
        let mut s = Spinner::new(US * 50, SpinMode::Adaptive, Awaited::Request);
        for _ in 0..50 {
            let t = s.start(Peer::Rung);
            s.finish(t, Outcome::Slept(t.budget));
            let t = s.start(Peer::Polling);
            s.finish(t, Outcome::Spun(US));
        }
        assert!(s.policy(Peer::Rung).is_off());
        assert!(!s.policy(Peer::Polling).is_off());
        assert_eq!(s.start(Peer::Polling).budget, MIN_SPIN);
    }

    /// An answer is sure to come: a spin is worth what a sleep costs, however short the
    /// usual answer, so one slow answer does not make the next waits sleep (and the peer's
    /// with them).
    #[test]
    fn answers_spin_as_long_as_a_sleep_costs() {
        let mut p = answers(50);
        spin_ok(&mut p, US * 2, 20);
        assert_eq!(p.budget(), MIN_SPIN, "fast answers, no sleep seen yet");
        // One answer comes only after a sleep, 40 µs after the wait began.
        let b = p.budget();
        p.record(b, Outcome::Slept(US * 40));
        spin_ok(&mut p, US * 2, 1);
        assert_eq!(
            p.budget(),
            US * 40,
            "the cost of the sleep is the floor now"
        );
        // ... within the maximum.
        let b = p.budget();
        p.record(b, Outcome::Slept(US * 400));
        spin_ok(&mut p, US * 2, 1);
        assert_eq!(p.budget(), US * 50);
        // A request may never come: no such floor.
        let mut q = adaptive(50);
        spin_ok(&mut q, US * 2, 20);
        let b = q.budget();
        q.record(b, Outcome::Slept(US * 40));
        spin_ok(&mut q, US * 2, 1);
        assert_eq!(q.budget(), MIN_SPIN);
    }

    /// Backing off works the same for answers: spins that keep failing turn spinning off,
    /// however much a sleep costs.
    #[test]
    fn answers_back_off_too() {
        let mut p = answers(50);
        spin_ok(&mut p, US * 2, 20);
        for _ in 0..OFF_AFTER {
            let b = p.budget();
            p.record(b, Outcome::Slept(US * 3000));
        }
        assert!(p.is_off());
        assert_eq!(p.budget(), Duration::ZERO);
    }

    #[test]
    fn the_mode_comes_from_the_environment() {
        // Only the parsing; the variable itself is left alone (tests run in parallel).
        assert_eq!(SpinMode::default(), SpinMode::Adaptive);
        let fixed = matches!(std::env::var(SPIN_ENV), Ok(v) if v.eq_ignore_ascii_case("fixed"));
        assert_eq!(SpinMode::from_env() == SpinMode::Fixed, fixed);
    }
}
