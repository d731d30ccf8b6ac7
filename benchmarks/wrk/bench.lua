-- The one wrk script of the benchmark: the request's shape comes from its
-- arguments, and at the end it prints one line "BENCH-JSON {...}" that
-- benchmarks/run.py reads (requests, errors, latency percentiles in us).
--
--   wrk -s benchmarks/wrk/bench.lua URL                      GET
--   wrk -s benchmarks/wrk/bench.lua URL -- POST 1048576      POST of 1 MiB
--
-- wrk.init formats the request after calling init(), so -H headers (such as
-- "Connection: close") are kept.

function init(args)
   local method, size = args[1], tonumber(args[2] or "0")
   if method and method ~= "GET" then
      wrk.method = method
      wrk.headers["Content-Type"] = "application/octet-stream"
      wrk.body = string.rep("x", size)
   end
end

function done(summary, latency, requests)
   local e = summary.errors
   local p = {}
   for _, q in ipairs({50, 90, 99, 99.9}) do
      table.insert(p, string.format('"%s": %d', tostring(q), latency:percentile(q)))
   end
   io.write(string.format(
      'BENCH-JSON {"requests": %d, "duration_us": %d, "bytes": %d, ' ..
      '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, ' ..
      '"latency_us": {"mean": %.1f, "max": %d, %s}}\n',
      summary.requests, summary.duration, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency.mean, latency.max, table.concat(p, ", ")))
end
