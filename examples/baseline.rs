//! The baseline under penstock's hot path: the least a hyper proxy does for the
//! same request, built the way penstock is (one `current_thread` runtime per
//! core, each with its own `SO_REUSEPORT` listener, hyper's own client
//! connections, mimalloc, the request body buffered) and nothing else: no
//! budget, cache, metrics, log line or context. `bash benches/instructions.sh
//! baseline` counts its instructions per request beside penstock's.
//!
//! `cargo run --release --example baseline -- 127.0.0.1:8080 127.0.0.1:9000`
//! (listen, upstream). Each client connection gets one upstream connection.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;

#[global_allocator]
static GLOBAL: mialloc::Mimalloc = mialloc::Mimalloc;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn listen(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Serves one client connection through one upstream connection.
async fn serve(client: TcpStream, upstream: SocketAddr) -> Result<(), BoxError> {
    let io = TcpStream::connect(upstream).await?;
    io.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(conn);
    let sender = Arc::new(Mutex::new(sender));
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let sender = sender.clone();
        async move {
            let (mut parts, body) = req.into_parts();
            let bytes = body.collect().await?.to_bytes();
            parts.headers.remove(hyper::header::CONTENT_LENGTH);
            let req = Request::from_parts(parts, Full::<Bytes>::new(bytes));
            let mut sender = sender.lock().await;
            sender.ready().await?;
            let resp: Response<Incoming> = sender.send_request(req).await?;
            Ok::<_, hyper::Error>(resp)
        }
    });
    hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(client), svc)
        .await?;
    Ok(())
}

fn main() -> Result<(), BoxError> {
    let mut args = std::env::args().skip(1);
    let (Some(addr), Some(upstream)) = (args.next(), args.next()) else {
        return Err("usage: baseline LISTEN UPSTREAM".into());
    };
    let (addr, upstream): (SocketAddr, SocketAddr) = (addr.parse()?, upstream.parse()?);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut running = Vec::new();
    for _ in 0..threads {
        let listener = listen(addr)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        running.push(std::thread::spawn(move || {
            runtime.block_on(async move {
                let Ok(listener) = TcpListener::from_std(listener) else {
                    return;
                };
                while let Ok((client, _)) = listener.accept().await {
                    let _ = client.set_nodelay(true);
                    tokio::spawn(serve(client, upstream));
                }
            })
        }));
    }
    for thread in running {
        let _ = thread.join();
    }
    Ok(())
}
