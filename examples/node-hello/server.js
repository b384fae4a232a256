const http = require('http');

const port = 8080;
http.createServer((req, res) => {
  res.writeHead(200, { 'Content-Type': 'text/plain' });
  res.end('hello from vmshim\n');
}).listen(port, () => console.log(`listening on ${port}`));
