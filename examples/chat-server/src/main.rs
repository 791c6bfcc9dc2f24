//! `chat-destinations`: the stock `destinations` program (`serve`, `send`, `list`, `check`, ...)
//! with the chat destination added.

fn main() -> anyhow::Result<()> {
    destinations_server::Server::new()
        .register(destinations_chat::PLUGIN)
        .run()
}
