-- Prepended to the scripts that take from GCRA buckets. A bucket is its theoretical arrival
-- time in microseconds of Redis server time; one cell every `every` µs, up to `burst` at once.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
-- The bucket's arrival time after taking `cells`, and how long until that is allowed (> 0:
-- not yet).
local function probe(key, every, burst, cells)
  local tat = tonumber(redis.call('GET', key) or now)
  if tat < now then tat = now end
  local new_tat = tat + every * cells
  local allow_at = new_tat - every * burst
  return new_tat, allow_at - now
end
-- Keeps `tat` as the bucket's arrival time until it has passed.
local function store_tat(key, tat)
  redis.call('SET', key, string.format('%.0f', tat), 'PX', math.floor((tat - now) / 1000) + 1000)
end
