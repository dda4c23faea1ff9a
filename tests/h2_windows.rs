//! Receive windows lowered on a live connection: a story at the HTTP/2
//! layer, with the h2 build ringpeer links (third_party/h2) over real
//! loopback sockets and glommio.
//!
//! ringpeer lowers SETTINGS_INITIAL_WINDOW_SIZE on tunnels and peer links
//! when the shard's window pool runs short (`transport::window`). A stream
//! that had received data and handed it all on before the SETTINGS ACK
//! came back then owed its sender a WINDOW_UPDATE, but h2 0.4.20 only
//! checked for one when more capacity was released. No more data could
//! come, so none was ever released, and the stream stalled for good:
//! `ringpeer bench --shards 2` stopped in its 16-stream bulk phase with
//! 256 KiB delivered on each stream and every socket idle.

use std::cell::Cell;
use std::future::poll_fn;
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use futures_lite::future::or;
use glommio::net::{TcpListener, TcpStream};
use ringpeer::runtime::{block_on, timeout};
use ringpeer::transport::io::GlommioIo;

const FIRST: usize = 256 << 10;
const LOWERED: u32 = 64 << 10;

/// Reads `n` bytes of `body`, returning each chunk's credit at once (as
/// the relay does once a chunk is handed on).
async fn read_and_release(body: &mut h2::RecvStream, n: usize) -> usize {
    let mut got = 0;
    while got < n {
        match poll_fn(|cx| body.poll_data(cx)).await {
            Some(Ok(c)) => {
                got += c.len();
                body.flow_control().release_capacity(c.len()).unwrap();
            }
            _ => break,
        }
    }
    got
}

#[test]
fn a_stream_keeps_flowing_after_its_window_is_lowered_below_what_it_already_received() {
    // The server's streams start with 4 MiB windows. The client sends
    // 256 KiB on one stream; the server reads and releases all of it (no
    // WINDOW_UPDATE is due: 256 KiB is below half the window). The server
    // then lowers the stream window to 64 KiB. Once the ACK is in, the
    // stream's window is 64 KiB - 256 KiB below zero, the 256 KiB released
    // make it 64 KiB again, and that WINDOW_UPDATE is due at once. The next
    // 64 KiB the client sends must arrive.
    let outcome = block_on("h2-windows", || async {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let lowered = Rc::new(Cell::new(false));
        let lowered_c = lowered.clone();
        let client = glommio::spawn_local(async move {
            let io = GlommioIo::new(TcpStream::connect(addr).await.unwrap());
            let (send, conn) = h2::client::handshake(io).await.unwrap();
            glommio::spawn_local(async move {
                let _ = conn.await;
            })
            .detach();
            let mut send = send.ready().await.unwrap();
            let req = http::Request::post("http://test/upload").body(()).unwrap();
            let (_resp, mut body) = send.send_request(req, false).unwrap();
            body.send_data(Bytes::from(vec![1u8; FIRST]), false).unwrap();
            while !lowered_c.get() {
                glommio::timer::sleep(Duration::from_millis(5)).await;
            }
            // Time for the SETTINGS to reach this side and its ACK the server.
            glommio::timer::sleep(Duration::from_millis(200)).await;
            body.send_data(Bytes::from(vec![2u8; LOWERED as usize]), false).unwrap();
            // Keep the stream open while the server reads.
            glommio::timer::sleep(Duration::from_secs(4)).await;
            drop(body);
        });
        let s = listener.accept().await.unwrap();
        let mut conn = h2::server::Builder::new()
            .initial_window_size(4 << 20)
            .initial_connection_window_size(32 << 20)
            .handshake::<_, Bytes>(GlommioIo::new(s))
            .await
            .unwrap();
        let (req, _respond) = conn.accept().await.unwrap().unwrap();
        let mut body = req.into_body();
        // The connection is driven (accept) while the body is read.
        let first = or(async { Some(read_and_release(&mut body, FIRST).await) }, async {
            let _ = conn.accept().await;
            None
        })
        .await;
        assert_eq!(first, Some(FIRST), "the first 256 KiB arrive");
        conn.set_initial_window_size(LOWERED).unwrap();
        lowered.set(true);
        let second = or(
            async { timeout(Duration::from_secs(3), read_and_release(&mut body, LOWERED as usize)).await.ok() },
            async {
                let _ = conn.accept().await;
                None
            },
        )
        .await;
        client.await;
        second
    })
    .unwrap();
    assert_eq!(outcome, Some(LOWERED as usize), "the 64 KiB sent after the window was lowered arrived within 3 s");
}
