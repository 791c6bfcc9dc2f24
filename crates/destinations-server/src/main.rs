//! `destinations`: the server and its command line, with every stock destination kind.

fn main() -> anyhow::Result<()> {
    destinations_server::Server::new().run()
}
