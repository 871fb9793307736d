"""The Lua scripts of `RedisState` (kvtier.controller.redis_state) and the keys they work on.

Each script touches the two keys of one instance, which share the instance's `{id}` hash tag and so
one cluster slot (a script may only touch keys of one slot):

    META   <prefix>{<id>}:meta   hash: reg (Registration JSON), session, hb (last heartbeat, wall
                                 clock seconds), usage (TierUsage list JSON), seq (last event batch),
                                 tier:<name> -> its mask bit, tier: -> every bit (a `cleared` of all)
    INDEX  <prefix>{<id>}:index  hash: 24-byte chunk key -> tier mask (decimal)

A script runs atomically, so checking "is this instance known, in this session and up" and acting
on it cannot interleave with another controller's re-registration or sweep of the same instance.
Values someone else wrote there (a `hb` that is no number, a key of another type, a mask that is
no small positive integer) never fail a script: the instance reads as unknown (it registers again,
which rewrites both keys), a bad mask as no tiers, and the sweep forgets such a record, so one
tampered instance cannot stop the answers or the sweeping for the others. `swept` in META marks an
instance whose keys a sweep dropped: refused until it registers again, even by a request whose `now`
still finds it up (it would be up with no keys, and never resend them).

Scripts are sent with EVAL each time (a few hundred bytes; Redis caches the compiled script by its
SHA), so a Redis restarted empty or a failed-over node needs no SCRIPT LOAD.
"""

from __future__ import annotations

# ARGV[1..3] = session, now, timeout. False unless the instance is known, in this session, up and
# not swept (and its record is a hash with a numeric hb: anything else is someone else's value).
_LIVE = """
local function live()
  local m = redis.pcall('HMGET', KEYS[1], 'session', 'hb', 'swept')
  if m.err then return false end
  local hb = tonumber(m[2])
  return m[1] and m[1] == ARGV[1] and hb and not m[3] and tonumber(ARGV[2]) - hb <= tonumber(ARGV[3])
end
"""

# A stored mask: a positive integer below 2^16 (16 tiers at most), else 0 (no tiers).
_MASK = """
local function mask_of(raw)
  local v = tonumber(raw)
  if not v or v < 1 or v >= 65536 or v % 1 ~= 0 then return 0 end
  return v
end
"""

# The index's entries, 0 when it is missing or not a hash.
_INDEX_LEN = """
local function index_len()
  if redis.call('TYPE', KEYS[2]).ok ~= 'hash' then return 0 end
  return redis.call('HLEN', KEYS[2])
end
"""

# KEYS: meta, index. ARGV: field, value, ... (reg, session, hb, usage, tier:<name> bits).
REGISTER = """
redis.call('UNLINK', KEYS[2])
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""

# KEYS: meta. ARGV: session, now, timeout, usage JSON. 1 recorded, 0 refused (register again).
HEARTBEAT = _LIVE + """
if not live() then return 0 end
if tonumber(ARGV[2]) > tonumber(redis.call('HGET', KEYS[1], 'hb')) then
  redis.call('HSET', KEYS[1], 'hb', ARGV[2])
end
redis.call('HSET', KEYS[1], 'usage', ARGV[4])
return 1
"""

# KEYS: meta. ARGV: session, now, timeout, seq. -1 refused; else the previous seq ('' for none),
# and `seq` is recorded (the caller compares: Lua numbers are doubles, seq may be 63 bits).
SEQUENCE = _LIVE + """
if not live() then return -1 end
local last = redis.call('HGET', KEYS[1], 'seq') or ''
redis.call('HSET', KEYS[1], 'seq', ARGV[4])
return last
"""

# KEYS: meta, index. ARGV: session, now, timeout, op, tier name ('' = every tier), keys...
# -1 refused, else 0. A tier the instance did not register is ignored.
EVENTS = _LIVE + _MASK + """
if not live() then return -1 end
local op = ARGV[4]
local kind = redis.call('TYPE', KEYS[2]).ok
if op == 'reset' or (kind ~= 'hash' and kind ~= 'none') then
  redis.call('UNLINK', KEYS[2])
  if op == 'reset' then return 0 end
end
local mask = mask_of(redis.call('HGET', KEYS[1], 'tier:' .. ARGV[5]))
if mask == 0 then return 0 end
local keys, first = ARGV, 6
if op == 'cleared' then keys, first = redis.call('HKEYS', KEYS[2]), 1 end
for i = first, #keys do
  local k = keys[i]
  local v = mask_of(redis.call('HGET', KEYS[2], k))
  if op == 'stored' then v = bit.bor(v, mask) else v = bit.band(v, bit.bnot(mask)) end
  if v == 0 then redis.call('HDEL', KEYS[2], k) else redis.call('HSET', KEYS[2], k, v) end
end
return 0
"""

# KEYS: meta, index. ARGV: now, timeout, forget_after. {keys removed, 1 when the record is gone}.
# A record without a numeric hb (or not a hash) is forgotten at once.
SWEEP = _INDEX_LEN + """
local hb = redis.pcall('HGET', KEYS[1], 'hb')
local age = (type(hb) == 'string') and tonumber(hb) and tonumber(ARGV[1]) - tonumber(hb)
if age and age <= tonumber(ARGV[2]) then return {0, 0} end
local n = index_len()
redis.call('UNLINK', KEYS[2])
if not age or age > tonumber(ARGV[3]) then
  redis.call('DEL', KEYS[1])
  return {n, 1}
end
redis.call('HSET', KEYS[1], 'swept', '1')
return {n, 0}
"""

# KEYS: meta, index. ARGV: reg, usage, hb as read. Forgets a record Python could not read, unless
# it changed since (a registration meanwhile). 1 forgotten, 0 left.
FORGET = """
if redis.call('TYPE', KEYS[1]).ok == 'hash' then
  local m = redis.call('HMGET', KEYS[1], 'reg', 'usage', 'hb')
  for i = 1, 3 do
    if (m[i] or '') ~= ARGV[i] then return 0 end
  end
end
redis.call('DEL', KEYS[1])
redis.call('UNLINK', KEYS[2])
return 1
"""
