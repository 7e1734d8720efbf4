"""DeepPlanning travel planning as tool-use tasks (paper §7, Table 7: the agentic setting, DeepPlanning travel
planning).

Data: Qwen-Agent's benchmark/deepplanning/travelplanning folder, with database_en.zip from the Hugging Face dataset
Qwen/DeepPlanning unzipped in its database/ folder: PATH/data/travelplanning_query_en.json and
PATH/database/database_en/id_<n>/<table>/<table>.csv. The benchmark has one set of tasks; "train" and "test" are
80 % / 20 % of a seeded shuffle of it. The nine tools keep the benchmark's names and parameters; their results
carry the CSV's own columns (named as in the official tool code; value formats such as "3" stars are assumed).

Scoring: the official score first turns the final plan into JSON with a hosted LLM (qwen-plus); here the text in
<plan></plan> is parsed with rules, so a line that strays from the benchmark's line format counts as absent, and
only English plans are read. The checks and their weights follow the official evaluation: 8 commonsense
dimensions, each all-or-nothing; personalized = 1 iff every hard constraint holds; reward = their mean.
"""
from __future__ import annotations

import csv
import functools
import json
import math
import random
import re
from pathlib import Path
from typing import Callable

import tip
from rollout import Task

SPLIT_SEED = 0
TABLES = {"trains": "trains/trains.csv", "flights": "flights/flights.csv", "hotels": "hotels/hotels.csv",
          "attractions": "attractions/attractions.csv", "restaurants": "restaurants/restaurants.csv",
          "locations": "locations/locations_coords.csv", "routes": "transportation/distance_matrix.csv"}
ATTRACTION_TYPES = ("Historical and Cultural", "Natural Scenery", "Art Exhibition", "City Landmark", "Theme Park",
                    "Leisure Experience")
SYSTEM_PROMPT = """You are a travel planner. The user's request is complete: do not ask questions. First gather facts \
with the tools, then write the whole plan inside <plan></plan>. Every name, time and price must come from a tool \
result, spelled exactly as returned.
Plan format, one block per day:
Day N:
Current City: from A to B (a travel day) or A
Accommodation: Hotel Name, ¥price/room/night (or - on the last day)
then one line per activity, back to back (each starts when the previous one ends):
HH:MM-HH:MM | travel_intercity_public | flight/train NUMBER, Departure Station - Arrival Station, ¥price/person
HH:MM-HH:MM | travel_city | Place A - Place B, distance, duration, ¥price per car (4 people per car)
HH:MM-HH:MM | attraction | Attraction Name, ¥price/person
HH:MM-HH:MM | meal | Lunch/Dinner, Restaurant Name, ¥price/person
HH:MM-HH:MM | hotel | Check-in/Check-out/Rest, Hotel Name
HH:MM-HH:MM | buffer | what happens (waiting, security check, baggage claim)
Rules: the trip starts and ends in the home city; every day but the last ends at the hotel; lunch and dinner on \
full days, at least 2 hours apart, 30-150 minutes each, within opening hours; attraction visits within opening \
hours, on open days, for the recommended number of hours; travel times as the route tool says; no place twice.
End with a budget summary whose last line is "Total Estimated Budget: N RMB": tickets, meals and trains/flights \
per person, rooms per room and night, taxis per car; stay within the user's budget."""


# ---------------------------------------------------------------- one task's database and its tools

class TravelDatabase:
    """One task's CSV tables (id_<n>/), each read on first use; every value stays a string, as written."""
    def __init__(self, folder: Path):
        self.folder, self.tables = Path(folder), {}

    def rows(self, table: str) -> list[dict]:
        if table not in self.tables:
            with open(self.folder / TABLES[table], encoding="utf-8-sig", newline="") as f:
                self.tables[table] = [{k: (v or "").strip() for k, v in row.items()} for row in csv.DictReader(f)]
        return self.tables[table]

    def find(self, table: str, column: str, value: str) -> dict | None:
        return next((row for row in self.rows(table) if row.get(column) == value), None)


def _json(value) -> str:
    return json.dumps(value, ensure_ascii=False)


def _date(value: str, name: str) -> str:
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", value or ""):
        raise ValueError(f"{name} must be a date written YYYY-MM-DD, got {value!r}")
    return value


def _timetable(db: TravelDatabase, table: str, origin: str, destination: str, date: str, seat_class: str) -> str:
    """Trains or flights of one day as routes (route_index): a transfer route lists its segments in
    segment_index order and costs its first segment's price, as the benchmark reports it."""
    routes = {}
    for row in sorted(db.rows(table), key=lambda r: (int(r["route_index"]), int(r["segment_index"]))):
        if (row["origin_city"], row["destination_city"], row["dep_date"]) == (origin, destination, date) \
                and seat_class in ("", row["seat_class"]):
            segment = {k: v for k, v in row.items() if k not in ("route_index", "segment_index", "price")}
            routes.setdefault(row["route_index"], {"segments": [], "price": float(row["price"] or 0)})
            routes[row["route_index"]]["segments"].append(dict(segment, seat_status=row["seat_status"] or "Available"))
    found = list(routes.values())
    return _json(found) if found else f"No {table[:-1]} information found from {origin} to {destination} on {date}"


def _listed(row: dict, *columns: str) -> dict:
    """A row with its ";"-separated columns (hotel services, restaurant tags) as lists."""
    return {k: [item for item in v.split(";") if item] if k in columns else v for k, v in row.items()}


def travel_tools(db: TravelDatabase) -> list[Callable]:
    """The benchmark's nine tools, bound to one task's database. A query with no answer returns a sentence that
    says so (as the benchmark's tools do); a malformed argument raises, and the model reads the error."""

    def query_train_info(origin: str, destination: str, depDate: str, seatClassName: str = "") -> str:
        """Train tickets between two cities on one day, direct and with a transfer: train number, stations, times,
        duration, seat class, remaining seats, price per person. Use names and numbers exactly as returned.

        Args:
            origin: Departure city name.
            destination: Arrival city name.
            depDate: Departure date, YYYY-MM-DD.
            seatClassName: Optional seat class: First Class Seat, Second Class Seat or Business Seat.
        """
        return _timetable(db, "trains", origin, destination, _date(depDate, "depDate"), seatClassName)

    def query_flight_info(origin: str, destination: str, depDate: str, seatClassName: str = "") -> str:
        """Flights between two cities on one day, direct and connecting: flight number, airports, times, duration,
        seat class, remaining seats, price per person, aircraft. Use names and numbers exactly as returned.

        Args:
            origin: Departure city name.
            destination: Arrival city name.
            depDate: Departure date, YYYY-MM-DD.
            seatClassName: Optional seat class: Economy Class, Business Class or First Class.
        """
        return _timetable(db, "flights", origin, destination, _date(depDate, "depDate"), seatClassName)

    def query_hotel_info(destination: str, checkinDate: str, checkoutDate: str, hotelStar: str = "",
                         hotelBrands: str = "") -> str:
        """Hotels at the destination: name, address, coordinates, stars, price per room and night, score, brand,
        renovation year, services. Use hotel names exactly as returned.

        Args:
            destination: Destination (city, district or county name).
            checkinDate: Check-in date, YYYY-MM-DD.
            checkoutDate: Check-out date, YYYY-MM-DD.
            hotelStar: Optional star rating, a single value from 1 to 5.
            hotelBrands: Optional single brand, e.g. Ji Hotel, Atour Hotel, Marriott, Hilton, Home Inn, Orange Hotel.
        """
        if _date(checkoutDate, "checkoutDate") <= _date(checkinDate, "checkinDate"):
            raise ValueError(f"checkoutDate {checkoutDate} must come after checkinDate {checkinDate}")
        if hotelStar and hotelStar.strip() not in ("1", "2", "3", "4", "5"):
            raise ValueError(f"hotelStar must be one value from 1 to 5, got {hotelStar!r}")
        # as in the benchmark, the destination filters nothing: a task's database holds its destination's hotels
        found = [_listed(r, "services") for r in db.rows("hotels") if hotelBrands in ("", r["brand"])
                 and (not hotelStar or float(r["hotel_star"] or 0) == float(hotelStar))]
        return _json(found) if found else f"No hotel found in {destination}: check the arguments or drop a filter"

    def query_attraction_details(attraction_name: str) -> str:
        """One attraction: city, address, coordinates, description, rating, opening and closing time, closing
        days, recommended visit hours (min_visit_hours, max_visit_hours), ticket price, type.

        Args:
            attraction_name: The attraction's exact name.
        """
        row = db.find("attractions", "attraction_name", attraction_name)
        return _json(row) if row else f"No attraction named {attraction_name!r} in the database"

    def recommend_attractions(city: str, attraction_type: str = "") -> str:
        """A city's popular attractions, optionally of one type: name, description, type. Only attractions
        returned here may appear in the plan, under exactly these names.

        Args:
            city: City name.
            attraction_type: Optional type: Historical and Cultural, Natural Scenery, Art Exhibition,
                City Landmark, Theme Park or Leisure Experience.
        """
        rows = db.rows("attractions")
        if attraction_type and attraction_type not in {*ATTRACTION_TYPES, *(r["attraction_type"] for r in rows)}:
            raise ValueError(f"unknown attraction_type {attraction_type!r}; choose one of "
                             f"{', '.join(ATTRACTION_TYPES)}")
        # as in the benchmark, the city filters nothing: a task's database holds its destination's attractions
        found = [{key: r[key] for key in ("attraction_name", "description", "attraction_type")}
                 for r in rows if attraction_type in ("", r["attraction_type"])]
        return _json(found) if found else f"No attractions found in {city}"

    def search_location(place_name: str) -> str:
        """Latitude and longitude (six decimals) of a place that another tool named.

        Args:
            place_name: The place's exact name: a hotel, attraction, restaurant, station or airport.
        """
        row = db.find("locations", "poi_name", place_name)
        return (_json({"place_name": place_name, "latitude": row["latitude"], "longitude": row["longitude"]}) if row
                else f"No coordinates found for {place_name!r}: use a name exactly as another tool returned it")

    def query_road_route_info(origin: str, destination: str) -> str:
        """Road route between two points: distance in meters, duration in minutes, cost. Up to 2 km it is a walk
        (cost 0), beyond that a taxi, whose cost is per car of up to 4 people.

        Args:
            origin: Start point, "latitude,longitude" with six decimals as search_location returns them.
            destination: End point, "latitude,longitude" with six decimals as search_location returns them.
        """
        for name, value in (("origin", origin), ("destination", destination)):
            if not re.fullmatch(r"-?\d+(\.\d+)?,-?\d+(\.\d+)?", value or ""):
                raise ValueError(f"{name} must be 'latitude,longitude' such as '32.041544,118.784268', got {value!r}")
        row = next((r for r in db.rows("routes") if (r["origin"], r["destination"]) == (origin, destination)), None)
        return _json(row) if row else f"No route found from {origin} to {destination}"

    def recommend_restaurants(latitude: str, longitude: str) -> str:
        """Restaurants near a point: name, coordinates, price per person, cuisine, opening hours, rating, tags.

        Args:
            latitude: Latitude with six decimals, as another tool returned it.
            longitude: Longitude with six decimals, as another tool returned it.
        """
        for name, value in (("latitude", latitude), ("longitude", longitude)):
            if not re.fullmatch(r"-?\d+(\.\d+)?", value or ""):
                raise ValueError(f"{name} must be a decimal number such as 32.041544, got {value!r}")
        found = [_listed(r, "tags") for r in db.rows("restaurants")
                 if (r["query_latitude"], r["query_longitude"]) == (latitude, longitude)]
        return _json(found) if found else f"No restaurants found near ({latitude}, {longitude})"

    def query_restaurant_details(restaurant_name: str) -> str:
        """One restaurant: coordinates, price per person, cuisine, opening and closing time, rating, tags.

        Args:
            restaurant_name: The restaurant's exact name.
        """
        row = db.find("restaurants", "restaurant_name", restaurant_name)
        return _json(_listed(row, "tags")) if row else f"No restaurant named {restaurant_name!r} in the database"

    return [query_train_info, query_flight_info, query_hotel_info, query_attraction_details, recommend_attractions,
            search_location, query_road_route_info, recommend_restaurants, query_restaurant_details]


# ---------------------------------------------------------------- the final plan, parsed with rules

def _minutes(clock: str) -> int:
    hours, minutes = clock.split(":")
    return int(hours) * 60 + int(minutes)


def _price(text: str) -> float | None:
    found = (re.search(r"[¥￥]\s*(\d[\d,]*(?:\.\d+)?)", text)
             or re.search(r"(\d[\d,]*(?:\.\d+)?)\s*(?:rmb|yuan|cny)", text, re.I))
    return float(found.group(1).replace(",", "")) if found else (0.0 if "free" in text.lower() else None)


def _name_and_price(text: str) -> tuple[str, float | None]:
    head, comma, tail = text.rpartition(",")
    return (head.strip(), _price(tail)) if comma and _price(tail) is not None else (text.strip(), None)


def _ends(route: str) -> tuple[str, str]:
    start, _, end = route.partition(" - ") if " - " in route else route.partition("-")
    return start.strip(), end.strip()


def parse_plan(text: str) -> tuple[list[dict], float | None]:
    """(days, stated total) of a plan written in the benchmark's line format (see SYSTEM_PROMPT). A day is
    {"city", "hotel": (name, price) or None, "acts"}; an act has start and end in minutes, type, and the fields
    of its type (name, price, from, to, mode, number)."""
    text = re.sub(r"<think>.*?</think>", "", text, flags=re.S)
    plans = re.findall(r"<plan>(.*?)(?:</plan>|$)", text, flags=re.S)
    days, total, summary = [], None, False
    for line in (plans[-1] if plans else text).splitlines():
        line = line.replace("**", "").strip().lstrip("#-* ").strip()
        if found := re.match(r"total estimated budget\D*?(\d[\d,]*(?:\.\d+)?)", line, re.I):
            total = float(found.group(1).replace(",", ""))
        elif re.match(r"day\s*\d+\b", line, re.I):
            days.append({"city": "", "hotel": None, "acts": []})
        elif not days or summary or re.match(r"budget summary", line, re.I):
            summary = bool(days)  # the summary's lines (e.g. "Accommodation: 882 RMB") belong to no day
            continue
        elif found := re.match(r"current city\s*[:：]\s*(.*)", line, re.I):
            days[-1]["city"] = found.group(1).strip()
        elif found := re.match(r"accommodation\s*[:：]\s*(.*)", line, re.I):
            name, price = _name_and_price(found.group(1).replace("/room/night", ""))
            days[-1]["hotel"] = None if name in ("", "-") else (name, price)
        elif found := re.match(r"(\d{1,2}:\d{2})\s*[-–~]\s*(\d{1,2}:\d{2})\s*\|\s*(\w+)\s*\|\s*(.*)", line):
            (start, end), kind, details = map(_minutes, found.group(1, 2)), found.group(3), found.group(4)
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
    return re.sub(r"[（(].*?[)）]", "", text or "").strip()


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
        elif trip:
            leave, arrive = trip["start"] / 60, trip["end"] / 60
            if start != org:
                meals_ok &= not meals if leave < 9 else len(meals) <= 1 if leave < 15 else bool(meals) and spaced
                sights_ok &= leave <= 16 or bool(sights)
            if end != org:
                meals_ok &= (len(meals) >= 2 and spaced if arrive < 10 else bool(meals) and spaced if arrive < 15
                             else len(meals) <= 1)
                sights_ok &= arrive >= 12 or bool(sights)
    return meals_ok, sights_ok


def _transfers_ok(days: list[dict], db: TravelDatabase) -> bool:
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


def plan_checks(meta: dict, db: TravelDatabase, days: list[dict], total: float | None) -> dict[str, bool]:
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


def deepplanning_reward(meta: dict, db: TravelDatabase, conversation: list[dict]) -> float:
    """The official composite score from rule-parsed plan text: (commonsense + personalized) / 2, where
    commonsense is the share of DIMENSIONS whose checks all pass and personalized is 1 iff every hard constraint
    holds. The plan is the last assistant message's <plan> (0 when it holds no day)."""
    text = next((m.get("content") or "" for m in reversed(conversation) if m["role"] == "assistant"), "")
    days, total = parse_plan(text)
    if not days:
        return 0.0
    checks = plan_checks(meta, db, days, total)
    commonsense = sum(all(checks[name] for name in names) for names in DIMENSIONS.values()) / len(DIMENSIONS)
    hard = [checks[key] for key in meta.get("hard_constraints", {}) if key in checks]
    return (commonsense + float(bool(hard) and all(hard))) / 2


# ---------------------------------------------------------------- tasks and splits

def deepplanning_tasks(path: str, split: str, language: str = "en") -> list[Task]:
    """The tasks of a split ("train": 80 % of a seeded shuffle of the task ids, "test": the other 20 %), each
    with the benchmark's opening messages, tools bound to its own database, and its reward."""
    if split not in ("train", "test"):
        raise tip.InputError(f"unknown DeepPlanning split {split!r}: choose train or test")
    root = Path(path)
    queries = root / "data" / f"travelplanning_query_{language}.json"
    databases = root / "database" / f"database_{language}"
    expected = (f"expected the benchmark's travelplanning folder (Qwen-Agent benchmark/deepplanning/travelplanning) "
                f"holding data/travelplanning_query_{language}.json and database/database_{language}/id_<n>/ "
                f"(unzip database_{language}.zip from the Hugging Face dataset Qwen/DeepPlanning in database/)")
    if not root.is_dir():
        raise tip.InputError(f"DeepPlanning folder {path!r} does not exist; {expected}")
    if not queries.is_file():
        raise tip.InputError(f"{queries} is missing; {expected}")
    try:
        samples = json.loads(queries.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise tip.InputError(f"{queries} is not valid JSON ({error}); {expected}") from None
    if not isinstance(samples, list) or not all(isinstance(s, dict) and {"id", "query", "meta_info"} <= s.keys()
                                                for s in samples):
        raise tip.InputError(f"{queries} is not a list of tasks with id, query and meta_info; {expected}")
    for sample in samples:
        folder = databases / f"id_{sample['id']}"
        if missing := [table for table in TABLES.values() if not (folder / table).is_file()]:
            raise tip.InputError(f"task {sample['id']}: {folder} lacks {', '.join(missing)}; {expected}")
    order = sorted(samples, key=lambda s: str(s["id"]).zfill(9))  # the benchmark's order, then a fixed shuffle
    random.Random(SPLIT_SEED).shuffle(order)
    cut = len(order) * 4 // 5
    tasks = []
    for sample in order[:cut] if split == "train" else order[cut:]:
        db = TravelDatabase(databases / f"id_{sample['id']}")
        reward = functools.partial(deepplanning_reward, sample["meta_info"], db)
        tasks.append(Task([{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": sample["query"]}],
                          travel_tools(db), reward))
    return tasks
