-- Prepended to the scripts that reserve on budget lines (after limits_in_force.lua).
-- KEYS[1..n]: the lines' counters (hashes: spent, reserved); ARGV as limits_in_force.lua says.
-- Amounts pass as decimal strings and are compared as (millions, remainder) pairs: Lua numbers
-- are doubles, exact only to 2^53 picodollars (about $9,000), and budgets may be larger.
local B = 1000000
local function split(s)
  s = tostring(s or "0")
  if s == "" or string.sub(s, 1, 1) == "-" then return 0, 0 end
  local n = #s
  if n <= 6 then return 0, tonumber(s) end
  return tonumber(string.sub(s, 1, n - 6)), tonumber(string.sub(s, n - 5))
end
local function add(ah, al, bh, bl)
  local l = al + bl
  return ah + bh + math.floor(l / B), l % B
end
local function greater(ah, al, bh, bl)
  return ah > bh or (ah == bh and al > bl)
end
-- Every line's state {spent, reserved} (strings, "0" when unset), and the index of the first
-- line whose limit has no room for `amount` on top (nil when all have room).
local function lines_with_room(n, limits, amount)
  local states = {}
  local full = nil
  local ah, al = split(amount)
  for i = 1, n do
    local state = redis.call('HMGET', KEYS[i], 'spent', 'reserved')
    states[i] = {state[1] or "0", state[2] or "0"}
    local limit = limits[i]
    if full == nil and limit ~= "" then
      local sh, sl = split(states[i][1])
      local rh, rl = split(states[i][2])
      local th, tl = add(sh, sl, rh, rl)
      th, tl = add(th, tl, ah, al)
      local lh, ll = split(limit)
      if greater(th, tl, lh, ll) then full = i end
    end
  end
  return states, full
end
-- Adds `amount` to every line's reservation and keeps each counter its time.
local function reserve_lines(n, amount)
  for i = 1, n do
    local base = 3 + (i - 1) * 3
    redis.call('HINCRBY', KEYS[i], 'reserved', amount)
    redis.call('EXPIRE', KEYS[i], ARGV[base + 3])
  end
end
