//! Background threads: the click aggregator, the click-count checkpoints and the snapshot policy
//! run under the idle scheduling policy (`SCHED_IDLE`) on Linux, below the redirect workers. A
//! burst of background work on a CPU a worker shares (writing a million click counters,
//! building a snapshot) is then preempted the moment a request arrives instead of adding
//! milliseconds to its answer. The price is paid only when the CPUs are saturated: background
//! threads then get a sliver of CPU, so click events queue up and are dropped (counted, the
//! exact per-link counts are not affected), and checkpoints and snapshots wait. The WAL writer
//! is not a background thread: writes wait on it.

use std::io;
use std::thread::JoinHandle;

/// Spawns a named thread that lowers its own scheduling class, then runs `work`.
pub fn spawn_background<F, T>(name: &str, work: F) -> io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            lower_this_threads_priority();
            work()
        })
}

fn lower_this_threads_priority() {
    // On Linux a thread is its own scheduling entity, and pid 0 names the calling thread. Failing
    // to lower a priority changes nothing but latency, so the result is not checked.
    #[cfg(target_os = "linux")]
    // SAFETY: `param` lives across the call, which only reads it.
    unsafe {
        let param = libc::sched_param { sched_priority: 0 };
        libc::sched_setscheduler(0, libc::SCHED_IDLE, &param);
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// The scheduling policy of the calling thread, from /proc (field 41 of its stat line).
    fn own_policy() -> i64 {
        // SAFETY: gettid takes no arguments.
        let tid = unsafe { libc::gettid() };
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).expect("stat");
        // The fields after the parenthesised name start at field 3.
        let after_name = &stat[stat.rfind(')').expect("comm") + 2..];
        after_name
            .split(' ')
            .nth(41 - 3)
            .expect("policy field")
            .parse()
            .expect("a number")
    }

    #[test]
    fn background_threads_run_under_the_idle_policy_and_the_spawner_does_not() {
        let spawner = own_policy();
        let background = spawn_background("kurz-test-background", own_policy)
            .expect("spawn")
            .join()
            .expect("join");
        assert_eq!(background, i64::from(libc::SCHED_IDLE));
        assert_eq!(own_policy(), spawner);
        assert_ne!(spawner, i64::from(libc::SCHED_IDLE));
    }
}
