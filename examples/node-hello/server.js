const express = require('express');

const PORT = 8080;
const app = express();
app.get('/', (req, res) => {
  res.send('hello from vmshim\n');
});
app.listen(PORT, () => console.log(`listening on ${PORT}`));
