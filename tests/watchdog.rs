//! The systemd watchdog pinger, against a fake NOTIFY_SOCKET: it pings while
//! the tokio event loop runs and stops once the loop is blocked or uploads are
//! stalled, without systemd. (Its own test binary: it sets process-wide
//! environment.)

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

/// Drains the socket; counts `WATCHDOG=1` datagrams.
fn drain(sock: &UnixDatagram) -> usize {
    let mut n = 0;
    let mut buf = [0u8; 4096];
    while let Ok(len) = sock.recv(&mut buf) {
        if String::from_utf8_lossy(&buf[..len])
            .lines()
            .any(|l| l == "WATCHDOG=1")
        {
            n += 1;
        }
    }
    n
}

#[test]
fn pings_only_while_the_event_loop_runs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_nonblocking(true).unwrap();
    std::env::set_var("NOTIFY_SOCKET", &path);
    std::env::set_var("WATCHDOG_USEC", "600000"); // 600 ms: pings every 300 ms
    std::env::remove_var("WATCHDOG_PID");

    // One thread: blocking it blocks the whole event loop.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let stalled = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stalled.clone();
        let (stop, shutdown) = offloadd::shutdown::Stop::new();
        let heartbeat = offloadd::observe::systemd::spawn_watchdog(shutdown, move || {
            flag.load(std::sync::atomic::Ordering::Relaxed)
                .then_some("uploads in flight made no progress")
        });
        assert!(
            heartbeat.is_some(),
            "the watchdog starts under WATCHDOG_USEC"
        );

        // Healthy: the heartbeat task runs, the thread pings.
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        let healthy = drain(&sock);
        assert!(healthy >= 3, "only {healthy} pings in 1.5 s");

        // Wedged: block the only runtime thread. Pings may continue until
        // the heartbeat is older than the interval (600 ms), then stop.
        let t = Instant::now();
        std::thread::sleep(Duration::from_millis(1_000));
        drain(&sock); // pings of the grace period
        std::thread::sleep(Duration::from_millis(1_500));
        let wedged = drain(&sock);
        assert_eq!(wedged, 0, "{wedged} pings while the loop was blocked");
        assert!(t.elapsed() >= Duration::from_millis(2_500));

        // Responsive again: pings resume.
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        let again = drain(&sock);
        assert!(again >= 2, "pings did not resume ({again})");

        // Uploads stalled (the predicate says so): no pings, though the loop runs.
        stalled.store(true, std::sync::atomic::Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(400)).await;
        drain(&sock);
        tokio::time::sleep(Duration::from_millis(1_200)).await;
        let stuck = drain(&sock);
        assert_eq!(stuck, 0, "{stuck} pings while uploads were stalled");
        stalled.store(false, std::sync::atomic::Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(1_200)).await;
        assert!(drain(&sock) >= 2, "pings did not resume after the stall");

        // Stopping: the heartbeat task ends and is joined; pings go on while
        // the process stops.
        stop.fire();
        heartbeat.unwrap().await.unwrap();
        drain(&sock);
        tokio::time::sleep(Duration::from_millis(1_200)).await;
        assert!(drain(&sock) >= 2, "pings stop while the daemon stops");
    });
}
