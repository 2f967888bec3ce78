"""The ClientApp: one handler per message type, all in fellrec.runtime.flower.client."""

from flwr.clientapp import ClientApp

from fellrec.runtime.flower import client

app = ClientApp()
app.query()(client.handle_setup)
app.query("whoami")(client.handle_whoami)
app.train()(client.handle_train)
app.evaluate()(client.handle_evaluate)
app.evaluate("test")(client.handle_test)
