//! One host that opens many TCP connections to a site and never speaks cannot lock buyers out:
//! the site refuses more than a few handshakes in flight from one address, and drops a
//! handshake that does not finish within a few seconds.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use hashgrid_node::Multiaddr;
use hashgrid_node::network::pending::MAX_PENDING_PER_IP;
use hashgrid_tests::{addr_of, start_provider, test_builder, wait_for_asks};

fn tcp_port(addr: &Multiaddr) -> u16 {
    let s = addr.to_string();
    let after = s.split("/tcp/").nth(1).expect("a TCP listen address");
    after.split('/').next().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_sockets_from_one_host_do_not_lock_out_buyers() {
    hashgrid_tests::init_tracing();
    let site = start_provider(&[], 100, 8, None).await.unwrap();
    let addr = addr_of(&site).await.unwrap();
    let port = tcp_port(&addr);
    // 200 connections from 127.0.0.2 (another loopback address: another host, as far as the
    // site can tell) that never send a byte.
    let mut silent = Vec::new();
    for _ in 0..200 {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let to = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        if let Ok(Ok(c)) = tokio::time::timeout(Duration::from_secs(1), s.connect(to)).await {
            silent.push(c);
        }
    }
    assert!(silent.len() >= 100, "{} connected", silent.len());
    // A buyer from 127.0.0.1 still reaches the site and sees its offer at once.
    let started = Instant::now();
    let buyer = test_builder(&[addr])
        .region("us-east")
        .start()
        .await
        .unwrap();
    wait_for_asks(&buyer, 1).await.unwrap();
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "the buyer waited {took:?} behind the silent sockets"
    );
    // The site closed all but a few of the silent connections: reading finds EOF (or a reset)
    // on most of them.
    let mut closed = 0;
    for c in &mut silent {
        let mut buf = [0u8; 64];
        if let Ok(Ok(())) = tokio::time::timeout(Duration::from_millis(20), c.readable()).await
            && matches!(c.try_read(&mut buf), Ok(0) | Err(_))
        {
            closed += 1;
        }
    }
    assert!(
        closed >= silent.len() - MAX_PENDING_PER_IP - 8,
        "{closed} of {} closed",
        silent.len()
    );
    drop(silent);
    buyer.shutdown().await;
    site.shutdown().await;
}
