"""The ServerApp: fellrec.runtime.flower.server.server_main."""

from flwr.serverapp import ServerApp

app = ServerApp()


@app.main()
def main(grid, context) -> None:
    from fellrec.runtime.flower.server import server_main

    server_main(grid, context)
