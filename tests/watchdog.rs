//! systemd notifications against a fake NOTIFY_SOCKET, without systemd: the
//! watchdog pinger pings while the tokio event loop runs and stops once the
//! loop is blocked or uploads are stalled; a long start-up phase keeps asking
//! for more start-up time. (Its own test binary: it sets process-wide
//! environment, and its tests take turns, see [`ENV`].)

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

/// Held by each test while it sets the environment.
static ENV: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A fake NOTIFY_SOCKET, named in the environment.
fn notify_socket(dir: &std::path::Path) -> UnixDatagram {
    let path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_nonblocking(true).unwrap();
    std::env::set_var("NOTIFY_SOCKET", &path);
    sock
}

/// Drains the socket; counts the datagrams holding the line `line`.
fn drain_counting(sock: &UnixDatagram, line: &str) -> usize {
    let mut n = 0;
    let mut buf = [0u8; 4096];
    while let Ok(len) = sock.recv(&mut buf) {
        if String::from_utf8_lossy(&buf[..len])
            .lines()
            .any(|l| l == line)
        {
            n += 1;
        }
    }
    n
}

/// Drains the socket; counts `WATCHDOG=1` datagrams.
fn drain(sock: &UnixDatagram) -> usize {
    drain_counting(sock, "WATCHDOG=1")
}

/// A start-up phase longer than systemd's timeout (the rebuild after a lost
/// database, which reads every large file) asks for more time all along, not
/// once per step: one step may take minutes.
#[test]
fn a_long_start_up_phase_keeps_asking_for_time() {
    let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let sock = notify_socket(dir.path());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let every = Duration::from_millis(100);
    // Read as they come: a datagram socket queues only a few (a watchdog
    // thread an earlier test left pinging may send here too), and a full
    // queue drops what is sent.
    let reading = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let reader = {
        let (sock, reading) = (sock.try_clone().unwrap(), reading.clone());
        std::thread::spawn(move || {
            let mut asked = 0;
            while reading.load(std::sync::atomic::Ordering::Relaxed) {
                asked += drain_counting(&sock, "EXTEND_TIMEOUT_USEC=300000");
                std::thread::sleep(Duration::from_millis(5));
            }
            asked + drain_counting(&sock, "EXTEND_TIMEOUT_USEC=300000")
        })
    };
    let out = rt.block_on(offloadd::observe::systemd::while_starting(
        async {
            // One step of the phase, much longer than `every`.
            tokio::time::sleep(Duration::from_millis(1_050)).await;
            7
        },
        every,
    ));
    assert_eq!(out, 7, "the phase's own result");
    reading.store(false, std::sync::atomic::Ordering::Relaxed);
    let asked = reader.join().unwrap();
    assert!((9..=12).contains(&asked), "{asked} extensions in 1.05 s");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        drain_counting(&sock, "EXTEND_TIMEOUT_USEC=300000"),
        0,
        "none once the phase is over"
    );
}

#[test]
fn pings_only_while_the_event_loop_runs() {
    let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let sock = notify_socket(dir.path());
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
