-- Replaces a reservation with the real cost on every line.
-- KEYS: the lines' counters. ARGV: reserved, actual, then per line the seconds to keep it.
for i = 1, #KEYS do
  local left = redis.call('HINCRBY', KEYS[i], 'reserved', '-' .. ARGV[1])
  -- A counter that expired meanwhile (or was reset) must not keep a negative reservation.
  if left < 0 then redis.call('HSET', KEYS[i], 'reserved', 0) end
  redis.call('HINCRBY', KEYS[i], 'spent', ARGV[2])
  redis.call('EXPIRE', KEYS[i], ARGV[2 + i])
end
return 1
