"""Rule-based scoring of a DeepPlanning travel plan: the final <plan> parsed into days and activities, its cost,
and the official commonsense and hard-constraint checks, by their official names and in their 8 dimensions.

The plan is delivered as the official agent extracts it (extract_plan). What still differs from the official
scoring: the official pipeline turns the plan into JSON with a hosted LLM (qwen-plus); here rules parse the plan
text, so a line that strays from the benchmark's line format (the one deepplanning.SYSTEM_PROMPT asks for) counts
as absent, and only English plans are read. The rules read keywords and city names in any case and a price
however it is written (¥30, 30 RMB, CNY 30), where the official route match is case-sensitive.
"""
from __future__ import annotations

import math
import re
from typing import Protocol


class TravelTables(Protocol):
    """What the checks read of a task's database: a table's rows by its name (trains, flights, hotels,
    attractions, restaurants, locations, routes), every value a string. A protocol, so that the checks need not
    know where the tables come from (deepplanning.TravelDatabase reads them from the benchmark's CSV files)."""
    def rows(self, table: str) -> list[dict]: ...


# ---------------------------------------------------------------- the final plan, parsed with rules

def _minutes(clock: str) -> int:
    hours, minutes = clock.split(":")
    return int(hours) * 60 + int(minutes)


def _price(text: str) -> float | None:
    """A price however it is written: ¥30, 30 RMB, 30 yuan, CNY 30, RMB30; "free" is 0."""
    found = (re.search(r"(?:[¥￥]|\b(?:rmb|cny)(?![a-z]))\s*(\d[\d,]*(?:\.\d+)?)", text, re.I)
             or re.search(r"(\d[\d,]*(?:\.\d+)?)\s*(?:rmb|yuan|cny)\b", text, re.I))
    return float(found.group(1).replace(",", "")) if found else (0.0 if "free" in text.lower() else None)


def _name_and_price(text: str) -> tuple[str, float | None]:
    head, comma, tail = text.rpartition(",")
    return (head.strip(), _price(tail)) if comma and _price(tail) is not None else (text.strip(), None)


def _ends(route: str) -> tuple[str, str]:
    start, _, end = route.partition(" - ") if " - " in route else route.partition("-")
    return start.strip(), end.strip()


def extract_plan(text: str) -> str:
    """The delivered plan of a final message, as the official agent extracts it: after the last </think>, every
    closed <plan>...</plan> block (tags in any case), stripped and joined by a blank line; "" (nothing delivered)
    when there is none: no tags, or a <plan> never closed."""
    text = re.split(r"</think>", text, flags=re.I)[-1]
    blocks = [block.strip() for block in re.findall(r"<plan>(.*?)</plan>", text, flags=re.S | re.I)]
    return "\n\n".join(block for block in blocks if block)


def parse_plan(text: str) -> tuple[list[dict], float | None]:
    """(days, stated total) of a final message's delivered plan (extract_plan), written in the benchmark's line
    format (see deepplanning.SYSTEM_PROMPT); no days when nothing was delivered. A day is {"city", "hotel": (name,
    price) or None, "acts"}; an act has start and end in minutes, type, and the fields of its type (name, price,
    from, to, mode, number)."""
    days, total, summary = [], None, False
    for line in extract_plan(text).splitlines():
        line = line.replace("**", "").strip().lstrip("#-* ").strip()
        if found := re.match(r"total estimated budget\D*?(\d[\d,]*(?:\.\d+)?)", line, re.I):
            total = float(found.group(1).replace(",", ""))
        elif re.match(r"day\s*\d+\b", line, re.I):  # also after a summary: every delivered block is read
            days.append({"city": "", "hotel": None, "acts": []})
            summary = False
        elif not days or summary or re.match(r"budget summary", line, re.I):
            summary = bool(days)  # the summary's lines (e.g. "Accommodation: 882 RMB") belong to no day
            continue
        elif found := re.match(r"current city\s*[:：]\s*(.*)", line, re.I):
            days[-1]["city"] = found.group(1).strip()
        elif found := re.match(r"accommodation\s*[:：]\s*(.*)", line, re.I):
            name, price = _name_and_price(found.group(1).replace("/room/night", ""))
            days[-1]["hotel"] = None if name in ("", "-") else (name, price)
        elif found := re.match(r"(\d{1,2}:\d{2})\s*[-–~]\s*(\d{1,2}:\d{2})\s*\|\s*(\w+)\s*\|\s*(.*)", line):
            (start, end), kind, details = map(_minutes, found.group(1, 2)), found.group(3).lower(), found.group(4)
            act = {"start": start, "end": end + 1440 * (end < start), "type": kind, "name": "", "price": None}
            if kind == "travel_intercity_public":
                vehicle, _, rest = details.partition(",")
                route, act["price"] = _name_and_price(rest)
                words = vehicle.split() or [""]
                act["mode"], act["number"] = words[0].lower(), words[-1]
                act["from"], act["to"] = _ends(route)
            elif kind == "travel_city":
                route, *_, price = details.rsplit(",", 3) if details.count(",") >= 3 else (details, "")
                act["from"], act["to"], act["price"] = *_ends(route), _price(price)
            elif kind in ("meal", "hotel"):
                act["kind"], _, rest = details.partition(",")
                act["name"], act["price"] = _name_and_price(rest) if kind == "meal" else (rest.strip(), None)
            elif kind == "attraction":
                act["name"], act["price"] = _name_and_price(details)
            days[-1]["acts"].append(act)
    return days, total


# ---------------------------------------------------------------- the benchmark's rule-based checks

DIMENSIONS = {  # the official commonsense dimensions, each worth 1/8 when all its checks pass
    "route consistency": ("valid_trip_duration", "closed_loop_route_structure", "seamless_intercity_transfers"),
    "sandbox compliance": ("validated_accommodation", "validated_attractions", "validated_meals",
                           "validated_transportation"),
    "itinerary structure": ("traceable_accommodation", "ends_with_accommodation", "essential_meal_coverage",
                            "essential_attraction_coverage"),
    "time feasibility": ("no_time_overlaps", "reasonable_transfer_time"),
    "business hours": ("attraction_visit_within_opening_hours", "dining_within_service_hours",
                       "avoidance_of_closure_days"),
    "duration rationality": ("reasonable_duration_at_attractions", "reasonable_meal_duration"),
    "cost calculation accuracy": ("cost_calculation_correctness",),
    "activity diversity": ("diverse_meal_options", "diverse_attraction_options")}
WEEKDAYS = {name: i % 7 + 1 for i, name in enumerate("monday tuesday wednesday thursday friday saturday sunday "
                                                     "周一 周二 周三 周四 周五 周六 周日".split())}


def _city(text: str | None) -> str:
    """A city name as the checks compare it: without a parenthesised part, in any case ("hefei" is "Hefei")."""
    return re.sub(r"[（(].*?[)）]", "", text or "").strip().casefold()


def _from_to(current_city: str) -> tuple[str, str]:
    found = re.search(r"from\s+(.+?)\s+to\s+([^,]+)", current_city, re.I)
    return (_city(found.group(1)), _city(found.group(2))) if found else ("", "")


def _same_price(plan: float | None, table: str) -> bool:
    return not table or plan is not None and round(plan) == round(float(table))


def _within(start: int, end: int, opening: str, closing: str) -> bool | None:
    """Whether [start, end] lies in the opening hours (which may run past midnight); None if they are unreadable."""
    if not re.fullmatch(r"\d{1,2}:\d{2}", opening) or not re.fullmatch(r"\d{1,2}:\d{2}", closing):
        return None
    opens, closes = _minutes(opening), _minutes(closing)
    if opens <= closes:
        return opens <= start and end <= closes
    return start >= opens and end - 1440 <= closes if end > 1440 else start >= opens or end <= closes


def plan_cost(days: list[dict], meta: dict) -> float:
    """The plan's cost as the benchmark counts it: a day's first train or flight, tickets and meals per person,
    rooms per room and night (not after the last day), taxis per car of 4."""
    people, rooms = int(meta.get("people_number", 1)), int(meta.get("room_number", 1))
    cost = sum(people * (next((a["price"] for a in d["acts"] if a["type"] == "travel_intercity_public"), 0) or 0)
               for d in days)
    cost += sum(rooms * (d["hotel"][1] or 0) for d in days[:-1] if d["hotel"])
    for act in (a for d in days for a in d["acts"]):
        count = {"meal": people, "attraction": people, "travel_city": math.ceil(people / 4)}.get(act["type"], 0)
        cost += count * (act["price"] or 0)
    return cost


def _meals_and_sights(days: list[dict], org: str) -> tuple[bool, bool]:
    """essential_meal_coverage and essential_attraction_coverage: what a day needs depends on its hours away
    from home (the official thresholds: arrival before 10:00 / 15:00, departure before 9:00 / 15:00, ...)."""
    meals_ok = sights_ok = True
    for day in days:
        start, end = _from_to(day["city"])
        meals = sorted((a["start"], a["end"]) for a in day["acts"] if a["type"] == "meal")
        spaced = len(meals) < 2 or meals[1][0] - meals[0][1] >= 120
        sights = [a for a in day["acts"] if a["type"] == "attraction"]
        trip = next((a for a in day["acts"] if a["type"] == "travel_intercity_public"), None)
        if not start:  # a full day in one city: two meals; two sights or four hours around them
            names = {a["name"] for a in sights}
            busy = sum(a["end"] - a["start"] for a in day["acts"] if a["type"] == "attraction"
                       or a["type"] == "travel_city" and (a["from"] in names or a["to"] in names))
            meals_ok &= len(meals) >= 2 and spaced
            sights_ok &= busy >= 240 or len(sights) >= 2
        elif trip:  # the official rule reads the clock: a train that arrives at 00:30 arrives at 0.5
            leave, arrive = trip["start"] / 60, trip["end"] % 1440 / 60
            if start != org:
                meals_ok &= not meals if leave < 9 else len(meals) <= 1 if leave < 15 else bool(meals) and spaced
                sights_ok &= leave <= 16 or bool(sights)
            if end != org:
                meals_ok &= (len(meals) >= 2 and spaced if arrive < 10 else bool(meals) and spaced if arrive < 15
                             else len(meals) <= 1)
                sights_ok &= arrive >= 12 or bool(sights)
    return meals_ok, sights_ok


def _transfers_ok(days: list[dict], db: TravelTables) -> bool:
    """reasonable_transfer_time: between two anchored activities (hotel, sight, meal, train or flight), the time
    less buffers must match the route tool's duration (±5 minutes or to the 10 minutes); unknown places pass."""
    places = {r["poi_name"]: f'{r["latitude"]},{r["longitude"]}' for r in db.rows("locations")}
    routes = {(r["origin"], r["destination"]): float(r["duration_minutes"]) for r in db.rows("routes")}
    for day in days:
        anchors = [a for a in day["acts"] if a["type"] in ("hotel", "attraction", "meal", "travel_intercity_public")]
        for a, b in zip(anchors, anchors[1:]):
            here, there = a.get("to", a["name"]), b.get("from", b["name"])
            need = routes.get((places.get(here), places.get(there)))
            if here == there or need is None or b["start"] < a["end"]:  # overlaps are no_time_overlaps' business
                continue
            gap = b["start"] - a["end"] - sum(c["end"] - c["start"] for c in day["acts"] if c["type"] == "buffer"
                                              and a["end"] <= c["start"] and c["end"] <= b["start"])
            if not min(max(0, need - 5), need // 10 * 10) <= gap <= max(need + 5, math.ceil(need / 10) * 10):
                return False
    return True


def plan_checks(meta: dict, db: TravelTables, days: list[dict], total: float | None) -> dict[str, bool]:
    """Every official check, by its official name: the commonsense checks (DIMENSIONS) and the task's hard
    constraints (meta_info["hard_constraints"], by key: the named trains, flights, hotel, restaurant and sights
    appear in the plan; the budget holds)."""
    if not days:
        return dict.fromkeys([*(name for names in DIMENSIONS.values() for name in names),
                              *meta.get("hard_constraints", {})], False)
    of = lambda kind: [a for d in days for a in d["acts"] if a["type"] == kind]  # noqa: E731
    hotels, sights, dining = ({r[key]: r for r in db.rows(table)} for table, key in (
        ("hotels", "name"), ("attractions", "attraction_name"), ("restaurants", "restaurant_name")))
    fares, stations = {}, {}  # a train or flight number may have several fares (seat classes, routes)
    for row in db.rows("flights") + db.rows("trains"):
        fares.setdefault(row.get("flight_no") or row.get("train_no"), set()).add(round(float(row["price"] or 0)))
        stations |= {row["dep_station_name"]: _city(row["origin_city"]),
                     row["arr_station_name"]: _city(row["destination_city"])}
    org = _city(meta.get("org"))
    checks = {"valid_trip_duration": len(days) == int(meta.get("days") or 0) > 0,
              "closed_loop_route_structure": _from_to(days[0]["city"])[0] in ("", org)
              and _from_to(days[-1]["city"])[1] in ("", org)}
    here, seamless = org, True  # follow the traveller: a travel day leaves from where the last one ended
    for day in days:
        start, end = _from_to(day["city"])
        seamless &= start == here and any(stations.get(a["from"]) == start and stations.get(a["to"]) == end
                                          for a in day["acts"] if a["type"] == "travel_intercity_public") \
            if start else _city(day["city"]) == here
        here = end or here
    checks["seamless_intercity_transfers"] = seamless
    checks["validated_accommodation"] = all(name in hotels and _same_price(price, hotels[name]["price"])
                                            for name, price in (d["hotel"] for d in days if d["hotel"])) \
        and all(a["name"] in hotels for d in days[:-1] for a in d["acts"] if a["type"] == "hotel")
    checks["validated_attractions"] = all(
        a["name"] in sights and _same_price(a["price"], sights[a["name"]]["ticket_price"]) for a in of("attraction"))
    checks["validated_meals"] = all(
        a["name"] in dining and _same_price(a["price"], dining[a["name"]]["price_per_person"]) for a in of("meal"))
    checks["validated_transportation"] = all(
        a["number"] in fares and a["from"] and a["to"] and a["price"] is not None
        and round(a["price"]) in fares[a["number"]] for a in of("travel_intercity_public"))
    checks["traceable_accommodation"] = days[-1]["hotel"] is None and all(
        d["hotel"] and any(a["type"] == "hotel" for a in d["acts"]) for d in days[:-1])
    checks["ends_with_accommodation"] = all(d["acts"] and d["acts"][-1]["type"] == "hotel" for d in days[:-1])
    checks["essential_meal_coverage"], checks["essential_attraction_coverage"] = _meals_and_sights(days, org)
    in_order = [sorted(d["acts"], key=lambda a: a["start"]) for d in days]
    checks["no_time_overlaps"] = all(b["start"] >= a["end"] for acts in in_order for a, b in zip(acts, acts[1:]))
    checks["reasonable_transfer_time"] = _transfers_ok(days, db)
    always = ("Open 24 Hours", "全天开放")
    checks["attraction_visit_within_opening_hours"] = all(  # unreadable hours fail here, as officially
        sights[a["name"]]["opening_time"] in always and sights[a["name"]]["closing_time"] in always
        or _within(a["start"], a["end"], sights[a["name"]]["opening_time"], sights[a["name"]]["closing_time"])
        for a in of("attraction") if a["name"] in sights)
    checks["dining_within_service_hours"] = all(  # ... and are skipped here
        _within(a["start"], a["end"], dining[a["name"]]["opening_time"], dining[a["name"]]["closing_time"]) is not False
        for a in of("meal") if a["name"] in dining)
    weekday = int(meta.get("depart_weekday") or 0)  # 1 = Monday
    closed = {name: {WEEKDAYS.get(day.strip().lower()) for day in row["closing_dates"].split(",")}
              for name, row in sights.items()}
    checks["avoidance_of_closure_days"] = not weekday or not any(
        (weekday - 1 + i) % 7 + 1 in closed[a["name"]]
        for i, d in enumerate(days) for a in d["acts"] if a["type"] == "attraction" and a["name"] in sights)
    checks["reasonable_duration_at_attractions"] = all(
        float(sights[a["name"]]["min_visit_hours"] or "nan") <= (a["end"] - a["start"]) / 60
        <= float(sights[a["name"]]["max_visit_hours"] or "nan") for a in of("attraction") if a["name"] in sights)
    checks["reasonable_meal_duration"] = all(30 <= a["end"] - a["start"] <= 150 for a in of("meal"))
    cost = plan_cost(days, meta)
    checks["cost_calculation_correctness"] = total is not None and abs(cost - total) <= 0.1 * total
    for kind in ("meal", "attraction"):
        names = [a["name"] for a in of(kind) if a["name"]]
        checks[f"diverse_{kind}_options"] = len(names) == len(set(names))
    rides = of("travel_intercity_public")
    used = {"flight": {a["number"] for a in rides if a["mode"] in ("flight", "plane", "airplane")},
            "train": {a["number"] for a in rides if a["mode"] in ("train", "railway", "high-speed")},
            "hotel": {d["hotel"][0] for d in days if d["hotel"]}, "restaurant": {a["name"] for a in of("meal")},
            "attraction": {a["name"] for a in of("attraction")}}
    for key, wanted in meta.get("hard_constraints", {}).items():
        kind = key.split("_")[0]
        if key == "budget_constraint":
            checks[key] = cost <= float(wanted["max_budget"])
        elif kind in ("flight", "train"):
            checks[key] = all(wanted[f"{way}_{kind}_no"] in used[kind] for way in ("outbound", "inbound")
                              if f"{way}_{kind}_no" in wanted)
        elif kind in ("hotel", "restaurant"):
            checks[key] = wanted.get(f"{kind}_name") in used[kind]
        elif kind == "attraction":
            checks[key] = bool(wanted.get("attraction_names")) and set(wanted["attraction_names"]) <= used[kind]
    return checks
