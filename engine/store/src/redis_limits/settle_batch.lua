-- Applies a batch of settles, in the order they were made.
-- KEYS: every key the settles touch, in order. ARGV, per settle, its kind and then its figures:
-- "s", n, reserved, actual, then n seconds to keep: replaces a dollar reservation with the real
--   cost on the next n keys (budget lines);
-- "t", µs per cell, cells: moves the next key's token bucket by that many cells (negative gives
--   tokens back), never before now.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local k, a = 1, 1
while a <= #ARGV do
  if ARGV[a] == 's' then
    local n = tonumber(ARGV[a + 1])
    for i = 0, n - 1 do
      local key = KEYS[k + i]
      local left = redis.call('HINCRBY', key, 'reserved', '-' .. ARGV[a + 2])
      -- A counter that expired meanwhile (or was reset) must not keep a negative reservation.
      if left < 0 then redis.call('HSET', key, 'reserved', 0) end
      redis.call('HINCRBY', key, 'spent', ARGV[a + 3])
      redis.call('EXPIRE', key, ARGV[a + 4 + i])
    end
    k = k + n
    a = a + 4 + n
  else
    local key = KEYS[k]
    local tat = tonumber(redis.call('GET', key) or now)
    if tat < now then tat = now end
    tat = tat + tonumber(ARGV[a + 1]) * tonumber(ARGV[a + 2])
    if tat <= now then
      redis.call('DEL', key)
    else
      redis.call('SET', key, string.format('%.0f', tat), 'PX', math.floor((tat - now) / 1000) + 1000)
    end
    k = k + 1
    a = a + 3
  end
end
return 1
