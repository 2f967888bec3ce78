"""The ClientApp: one handler per message type, all in fellrec.runtime.flower.client."""

from flwr.clientapp import ClientApp

from fellrec.runtime.flower import client

app = ClientApp()
app.query()(client.handle_setup)
app.query("whoami")(client.handle_whoami)
app.train()(client.handle_train)
app.evaluate()(client.handle_evaluate)
app.evaluate("test")(client.handle_test)
# split mode (storage.k): the trunk's exchanges, one message further each (fellrec.runtime.flower.split)
app.query("split")(client.handle_split_setup)
app.train("split")(client.handle_train)
app.evaluate("split")(client.handle_evaluate)
app.evaluate("test_split")(client.handle_test)
