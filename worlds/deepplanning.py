"""DeepPlanning travel planning as tool-use tasks (paper §7, Table 7: the agentic setting, DeepPlanning travel
planning): each task is a conversation with the benchmark's tools, scored at its end by a rule-based reward.

Data: Qwen-Agent's benchmark/deepplanning/travelplanning folder, with database_en.zip from the Hugging Face dataset
Qwen/DeepPlanning unzipped in its database/ folder: PATH/data/travelplanning_query_en.json and
PATH/database/database_en/id_<n>/<table>/<table>.csv. "train" and "test" are 80 % / 20 % of a seeded shuffle of
the benchmark's one set of tasks. The nine tools keep the benchmark's names and parameters and answer as its
tools (Qwen-Agent's travelplanning/tools) do on the same CSV files: the same fields and shapes, the same numbers
made ints or floats, the same order and the same sentences when nothing matches. One difference: where no flight
matches, the official flight tool fails (its message wants an argument it is not given) and its agent shows the
error; here the model reads the sentence it meant. SYSTEM_PROMPT states the official prompt's rules and plan format
(agent/prompts.py) in its own words. The reward is the official composite score over the rule-based checks of
deepplanning_checks.py.
"""
from __future__ import annotations

import csv
import functools
import json
import math
import random
from pathlib import Path
from typing import Callable

import tip
from worlds.deepplanning_checks import DIMENSIONS, extract_plan, parse_plan, plan_checks
from rollout import Task

SPLIT_SEED = 0
TABLES = {"trains": "trains/trains.csv", "flights": "flights/flights.csv", "hotels": "hotels/hotels.csv",
          "attractions": "attractions/attractions.csv", "restaurants": "restaurants/restaurants.csv",
          "locations": "locations/locations_coords.csv", "routes": "transportation/distance_matrix.csv"}
SYSTEM_PROMPT = """You are an expert travel planner. Your job is a complete, workable and carefully reasoned itinerary \
for the trip the user asks for. The request already says everything the user wants: never ask a question and never \
ask the user to confirm anything.

Work in two stages:
1. Research. Call the tools for everything the plan needs: trains or flights, hotels, attractions, restaurants, \
coordinates, road routes, and their prices.
2. Planning. Once you know enough, write the whole plan between <plan> and </plan>, keeping to the format and the \
rules below.

WHERE FACTS COME FROM
- Every fact in the plan comes from a tool result. Invent, guess or borrow nothing; trust what the tools return.
- Attractions come from recommend_attractions (one it never returned must not appear), hotels from \
query_hotel_info, restaurants from recommend_restaurants, trains and flights from query_train_info and \
query_flight_info, walks and taxi rides from query_road_route_info.
- Write every name exactly as the tool wrote it, with nothing shortened, renamed or added: if a tool says "Xuanwu \
Lake Park", write "Xuanwu Lake Park", not "Xuanwu Lake"; other tools only find a place by its exact name.

PLAN FORMAT
The plan is a list of days. Each day opens with three header lines:
Day N:
Current City: from A to B (on a day that travels between cities) or A (on a day spent in one city)
Accommodation: Hotel Name, ¥price/room/night (on the last day, which has no hotel: Accommodation: -)
Then come the day's activities in time order, one per line, each "HH:MM-HH:MM | type | details" in one of six forms:
HH:MM-HH:MM | travel_intercity_public | train or flight NUMBER, Departure Station - Arrival Station, ¥price/person
HH:MM-HH:MM | travel_city | Start Place - End Place, distance, duration, ¥price (for example 3.2km, 15min, ¥25)
HH:MM-HH:MM | attraction | Attraction Name, ¥price/person
HH:MM-HH:MM | meal | Lunch or Dinner, Restaurant Name, ¥price/person
HH:MM-HH:MM | hotel | Check-in, Check-out or Rest, Hotel Name
HH:MM-HH:MM | buffer | what the time is for
Each activity starts the minute the previous one ends: no gaps and no overlaps. A buffer fills the time that \
intercity travel needs (security check and boarding before it, deplaning and baggage claim after it, a layover \
between two legs) or a short pause between two activities in the city. Every line that costs money (travel, \
attraction, meal) shows its price.
After the last day, still inside <plan>, write an itemized budget summary, each line with the sum that gives it:
Budget Summary:
Transportation: N RMB
Accommodation: N RMB
Meals: N RMB
Attractions & Tickets: N RMB
Total Estimated Budget: N RMB

RULES THE PLAN IS SCORED ON
Route
- The trip leaves from the user's home city and ends back there.
- Whenever one activity ends somewhere other than where the next begins, a travel_city or travel_intercity_public \
line takes the traveller from the one place to the other.
Times
- A train or flight line keeps the tool's departure and arrival times exactly.
- A travel_city line lasts the route tool's duration, give or take 5 minutes.
- A meal lasts 1 to 2 hours, inside the restaurant's opening_time-closing_time.
- An attraction visit lies inside its opening hours, on a day that is not one of its closed dates, and lasts \
between its minimum and maximum visit duration.
- Leave realistic buffers: at least 30-45 minutes after a flight lands before the next ride, and enough time \
before boarding.
Meals
- No breakfast: it is eaten at the hotel. At least 2 hours pass between the end of lunch and the start of dinner.
- A full day in one city has lunch and dinner.
- Arrival day, by the time you arrive: before 10:00, lunch and dinner; 10:00-15:00, dinner, lunch optional; after \
15:00, dinner at most.
- Departure day, by the time you leave: before 9:00, no meal in that city; 9:00-15:00, lunch optional and no \
dinner; after 15:00, at least lunch, dinner optional.
Shape of a day
- Every day but the last ends back at the hotel: its last line is a hotel line (Rest).
- The last day ends with the journey home: its last line is the train or flight that reaches the home city.
- No long idle stretches. A full day holds at least 2 attractions, or at least 4 hours at one large attraction, \
counting the rides to and from it. A travel day that arrives before 12:00 holds at least 1 attraction, and one \
that leaves after 16:00 holds at least 1 attraction before leaving.
- No restaurant and no attraction twice in the trip.
Data and budget
- Names, train and flight numbers, times and prices match the tool results exactly.
- Costs count as follows: train and flight tickets, attraction tickets and meals per person; a travel_city price \
per car, with up to 4 people in a car and the number of cars rounded up; a hotel price per room and night (rooms \
times nights).
- Each summary line is the exact sum of that kind of cost in the plan; the total is the sum of them all and stays \
within the user's budget.

EXAMPLE (its names and prices only illustrate the format: use those the tools return)
Request: 2 people from Shanghai to Suzhou, 2 days, 1 room.
<plan>
Day 1:
Current City: from Shanghai to Suzhou
Accommodation: Canal View Hotel, ¥600/room/night
08:00-08:30 | travel_intercity_public | train G7001, Shanghai Railway Station - Suzhou Railway Station, ¥40/person
08:30-08:50 | buffer | Leaving the station
08:50-09:10 | travel_city | Suzhou Railway Station - Canal View Hotel, 5.1km, 20min, ¥18
09:10-09:40 | hotel | Check-in, Canal View Hotel
09:40-09:55 | travel_city | Canal View Hotel - Humble Garden, 1.8km, 15min, ¥0
09:55-12:25 | attraction | Humble Garden, ¥70/person
12:25-12:35 | travel_city | Humble Garden - Pingjiang Noodle Shop, 0.6km, 10min, ¥0
12:35-13:35 | meal | Lunch, Pingjiang Noodle Shop, ¥45/person
13:35-13:55 | travel_city | Pingjiang Noodle Shop - Tiger Hill, 6.3km, 20min, ¥22
13:55-16:25 | attraction | Tiger Hill, ¥60/person
16:25-16:45 | travel_city | Tiger Hill - Canal View Hotel, 6.0km, 20min, ¥21
16:45-17:45 | hotel | Rest, Canal View Hotel
17:45-17:55 | travel_city | Canal View Hotel - Songhe Restaurant, 0.9km, 10min, ¥0
17:55-19:25 | meal | Dinner, Songhe Restaurant, ¥120/person
19:25-19:35 | travel_city | Songhe Restaurant - Canal View Hotel, 0.9km, 10min, ¥0
19:35-24:00 | hotel | Rest, Canal View Hotel

Day 2:
Current City: from Suzhou to Shanghai
Accommodation: -
08:30-09:00 | hotel | Check-out, Canal View Hotel
09:00-09:15 | travel_city | Canal View Hotel - Lion Grove Garden, 1.5km, 15min, ¥0
09:15-11:15 | attraction | Lion Grove Garden, ¥40/person
11:15-11:25 | travel_city | Lion Grove Garden - Guanqian Dumpling House, 0.7km, 10min, ¥0
11:25-12:25 | meal | Lunch, Guanqian Dumpling House, ¥50/person
12:25-12:45 | travel_city | Guanqian Dumpling House - Suzhou Railway Station, 3.9km, 20min, ¥15
12:45-13:15 | buffer | Security check and boarding
13:15-13:45 | travel_intercity_public | train G7012, Suzhou Railway Station - Shanghai Railway Station, ¥40/person

Budget Summary:
Transportation: 236 RMB. Trains (40+40)*2=160; taxis, one car for 2 people: 18+22+21+15=76
Accommodation: 600 RMB. 1 room, 1 night: 600*1*1=600
Meals: 430 RMB. (45+120+50)*2=430
Attractions & Tickets: 340 RMB. (70+60+40)*2=340
Total Estimated Budget: 1606 RMB
</plan>"""


# ---------------------------------------------------------------- one task's database and its tools

# The cells pandas.read_csv reads as missing (its default na_values): the official tools read every table with
# pandas (dtype=str), so such a cell reaches them as NaN, which they show as "nan", "" or a JSON NaN.
MISSING = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
                     "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"})


class TravelDatabase:
    """One task's CSV tables (id_<n>/), each read on first use: rows (every value a string, as written; what the
    checks read) and frame (as the official tools see them)."""
    def __init__(self, folder: Path):
        self.folder, self.tables, self.frames = Path(folder), {}, {}

    def rows(self, table: str) -> list[dict]:
        if table not in self.tables:
            with open(self.folder / TABLES[table], encoding="utf-8-sig", newline="") as f:
                self.tables[table] = [{k: (v or "").strip() for k, v in row.items()} for row in csv.DictReader(f)]
        return self.tables[table]

    def frame(self, table: str) -> list[dict]:
        """A table's rows as the official tools hold them: strings, with NaN for a missing cell (MISSING)."""
        if table not in self.frames:
            self.frames[table] = [{k: math.nan if v in MISSING else v for k, v in row.items()}
                                  for row in self.rows(table)]
        return self.frames[table]


def _json(value) -> str:
    """A result as the official tools write it."""
    return json.dumps(value, ensure_ascii=False, indent=2)


def _items(cell) -> list[str] | None:
    """A ";"-separated cell (hotel services, restaurant tags) split as the official tools split it; None when
    blank."""
    return cell.split(";") if isinstance(cell, str) and cell.strip() else None


def _cleaned(cell) -> str:
    """A hotel cell as the official hotel tool shows it: missing is ""."""
    return "" if isinstance(cell, float) and math.isnan(cell) else str(cell)


def _number(cell) -> float | None:
    """An attraction's number as the official tool reads it: a float, None when missing or not a number."""
    try:
        number = float(cell)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def _fare(cell) -> float | int:
    """A route's price: its first segment's, a float (NaN when missing, as pandas gives it), 0 when unreadable."""
    try:
        return float(cell)
    except (TypeError, ValueError):
        return 0


def _seats(cell) -> str:
    return "Available" if str(cell).strip().lower() in ("", "nan") else cell  # a blank status means seats are left


def _train_segment(row: dict, before: dict | None) -> dict:
    # a transfer's later segment names its departure city after the previous arrival station, as officially
    city = row["origin_city"] if before is None else before["arr_station_name"].split(" Station")[0]
    return {"arrCityName": row["destination_city"], "arrStationCode": row["arr_station_code"],
            "arrStationName": row["arr_station_name"], "depCityName": city,
            "depStationCode": row["dep_station_code"], "depStationName": row["dep_station_name"],
            "duration": int(row["duration"]), "arrDateTime": row["arr_datetime"], "depDateTime": row["dep_datetime"],
            "marketingTransportName": row["train_type"], "marketingTransportNo": row["train_no"],
            "seatClassName": row["seat_class"], "Remaining Seats": _seats(row["seat_status"])}


def _flight_segment(row: dict, before: dict | None) -> dict:
    return {"arrCityName": row["destination_city"], "arrStationCode": row["arr_station_code"],
            "arrStationName": row["arr_station_name"], "depCityName": row["origin_city"],
            "depStationCode": row["dep_station_code"], "depStationName": row["dep_station_name"],
            "duration": int(row["duration"]), "arrDateTime": row["arr_datetime"], "depDateTime": row["dep_datetime"],
            "marketingTransportName": row["airline"], "marketingTransportNo": row["flight_no"],
            "seatClassName": row["seat_class"], "Remaining Seats": _seats(row["seat_status"]),
            "equipSize": row["equip_size"], "equipType": row["equip_type"], "manufacturer": row["manufacturer"]}


def _timetable(db: TravelDatabase, table: str, origin: str, destination: str, date: str, seat_class: str) -> list:
    """The day's routes (route_index) between two cities, each {"Segment 1": ..., "Segment 2": ..., "price"}: its
    segments (of the asked seat class) in segment_index order and its first segment's price. The indexes are
    text, ordered as text ("10" before "2"), as the official tools order them."""
    rows = [r for r in db.frame(table) if (r["origin_city"], r["destination_city"], r["dep_date"])
            == (origin, destination, date) and (not seat_class or r["seat_class"] == seat_class)]
    segment = _train_segment if table == "trains" else _flight_segment
    routes = []
    for index in sorted({r["route_index"] for r in rows}):
        legs = sorted((r for r in rows if r["route_index"] == index), key=lambda r: r["segment_index"])
        route = {f"Segment {n}": segment(leg, legs[n - 2] if n > 1 else None) for n, leg in enumerate(legs, 1)}
        routes.append(route | {"price": _fare(legs[0]["price"])})
    return routes


def _hotel(row: dict) -> dict:
    shown = {key: _cleaned(row.get(column, "")) for key, column in (
        ("name", "name"), ("address", "address"), ("latitude", "latitude"), ("longitude", "longitude"),
        ("decorationTime", "decoration_time"), ("hotelStar", "hotel_star"), ("price", "price"), ("score", "score"),
        ("brand", "brand"))}
    return shown | ({"services": services} if (services := _items(row.get("services"))) else {})


def _attraction_card(row: dict) -> str:
    """An attraction as the official details tool writes it: labelled lines, numbers as floats."""
    text = {key: str(row.get(key, "")) for key in ("attraction_id", "attraction_name", "city", "address", "latitude",
                                                    "longitude", "description", "opening_time", "closing_time",
                                                    "closing_dates", "attraction_type")}
    rating, shortest, longest, ticket = (_number(row.get(key)) for key in (
        "rating", "min_visit_hours", "max_visit_hours", "ticket_price"))
    opening, closing = text["opening_time"], text["closing_time"]
    lines = [("Attraction ID", text["attraction_id"]), ("Attraction Name", text["attraction_name"]),
             ("City", text["city"]), ("Address", text["address"]),
             ("Coordinates", f"Latitude {text['latitude']}，Longitude {text['longitude']}"),
             ("Description", text["description"]),
             ("Rating", f"{'' if rating is None else rating}(average visitor rating)"),
             ("Opening Hours", opening if opening == closing else f"{opening} to {closing}"),
             ("Closed Dates", text["closing_dates"]),
             ("Minimum Visit Duration", f"{'' if shortest is None else shortest} hours"),
             ("Maximum Visit Duration", f"{'' if longest is None else longest} hours"),
             ("Ticket Price", f"{'0' if ticket is None else ticket} RMB"),
             ("Attraction Type", text["attraction_type"])]
    return "\n".join(f"{label}：{value}" for label, value in lines)  # full-width colons, as officially


def _restaurant(row: dict, rating: str, price: str) -> dict:
    """A restaurant as both official restaurant tools show it (they differ only in the defaults for an absent
    column): names and times as read, coordinates, price and rating as text, tags as a list when there are any."""
    shown = {"name": row.get("restaurant_name", ""), "latitude": str(row.get("latitude", 0)),
             "longitude": str(row.get("longitude", 0)), "price_per_person": str(row.get("price_per_person", price)),
             "cuisine": row.get("cuisine", ""), "opening_time": row.get("opening_time", ""),
             "closing_time": row.get("closing_time", ""),
             "nearby_attraction_name": row.get("nearby_attraction_name", ""), "rating": str(row.get("rating", rating))}
    return shown | ({"tags": tags} if (tags := _items(row.get("tags"))) else {})


def travel_tools(db: TravelDatabase) -> list[Callable]:
    """The benchmark's nine tools, bound to one task's database, each answering as the official tool does: the
    same fields, shapes and texts, and its sentence when nothing matches (a malformed argument, such as a date
    in another format, matches nothing). A missing argument raises, and the model reads the error."""

    def query_train_info(origin: str, destination: str, depDate: str, seatClassName: str = "") -> str:
        """Train tickets between two cities on one day, direct and with transfers: a list of routes, each a
        one-item list holding {"Segment 1": ..., "Segment 2": ..., "price"}; a segment has its cities, station
        names and codes, times, duration in minutes, train type and number, seat class and remaining seats, and a
        route's price per person is its first segment's. Use station names and train numbers exactly as returned.

        Args:
            origin: Departure city name.
            destination: Arrival city name.
            depDate: Departure date, YYYY-MM-DD.
            seatClassName: Optional seat class: First Class Seat, Second Class Seat or Business Seat.
        """
        routes = _timetable(db, "trains", origin, destination, depDate, seatClassName)
        if not routes:
            return f"No train information found from {origin} to {destination} on {depDate}"
        return _json([[route] for route in routes])

    def query_flight_info(origin: str, destination: str, depDate: str, seatClassName: str = "") -> str:
        """Flights between two cities on one day, direct and connecting: a list of routes, each {"Segment 1": ...,
        "Segment 2": ..., "price"}; a segment has its cities, airport names and codes, times, duration in minutes,
        airline and flight number, seat class, remaining seats and aircraft, and a route's price per person is its
        first segment's. Use airport names and flight numbers exactly as returned.

        Args:
            origin: Departure city name.
            destination: Arrival city name.
            depDate: Departure date, YYYY-MM-DD.
            seatClassName: Optional seat class: Economy Class, Business Class or First Class.
        """
        routes = _timetable(db, "flights", origin, destination, depDate, seatClassName)
        if not routes:
            return f"No flight information found from {origin} to {destination} on {depDate}"
        return _json(routes)

    def query_hotel_info(destination: str, checkinDate: str, checkoutDate: str, hotelStar: str = "",
                         hotelBrands: str = "") -> str:
        """Hotels at the destination: name, address, coordinates, renovation year (decorationTime), stars, price
        per room and night, score, brand and services. Use hotel names exactly as returned.

        Args:
            destination: Destination (city, district or county name).
            checkinDate: Check-in date, YYYY-MM-DD.
            checkoutDate: Check-out date, YYYY-MM-DD.
            hotelStar: Optional star rating, a single value from 1 to 5.
            hotelBrands: Optional single brand, e.g. Ji Hotel, Atour Hotel, Marriott, Hilton, Home Inn, Orange Hotel.
        """
        # as officially, neither the destination nor the dates filter: a task's database holds its own hotels
        found = [_hotel(r) for r in db.frame("hotels") if (not hotelStar or r.get("hotel_star") == hotelStar)
                 and (not hotelBrands or r.get("brand") == hotelBrands)]
        return _json(found) if found else (f"No hotel information found in {destination} from {checkinDate} to "
                                           f"{checkoutDate}, please check parameters or reduce constraints")

    def query_attraction_details(attraction_name: str) -> str:
        """One attraction, as labelled lines: ID, name, city, address, coordinates, description, rating, opening
        hours, closed dates, minimum and maximum visit duration in hours, ticket price, type.

        Args:
            attraction_name: The attraction's exact name.
        """
        row = next((r for r in db.frame("attractions") if r.get("attraction_name") == attraction_name), None)
        return _attraction_card(row) if row else f"Detailed information not found for attraction {attraction_name}"

    def recommend_attractions(city: str, attraction_type: str = "") -> str:
        """A city's popular attractions, optionally of one type, one line each: name, description, type. Only
        attractions returned here may appear in the plan, under exactly these names.

        Args:
            city: City name.
            attraction_type: Optional type: Historical and Cultural, Natural Scenery, Art Exhibition,
                City Landmark, Theme Park or Leisure Experience.
        """
        # as officially, the city filters nothing: a task's database holds its destination's attractions
        found = [r for r in db.frame("attractions")
                 if not attraction_type or r.get("attraction_type") == attraction_type]
        if not found:
            return "No attraction recommendations found"
        lines = [f"{r.get('attraction_name', '')}, {r.get('description', '')}. This is a "
                 f"{r.get('attraction_type', '')} type attraction" for r in found]
        return "\n".join(["Recommended attractions:\n", *lines])

    def search_location(place_name: str) -> str:
        """Latitude and longitude (six decimals) of a place that another tool named.

        Args:
            place_name: The place's exact name: a hotel, attraction, restaurant, station or airport.
        """
        row = next((r for r in db.frame("locations") if r.get("poi_name", r.get("place_name")) == place_name), None)
        if row is None:
            return (f"Coordinate information not found for location {place_name}, please check: 1. Whether the "
                    f"place name comes from other tool results; 2. Whether the place name is exactly consistent "
                    f"with tool results, no abbreviation, renaming or additional description allowed")
        return _json({"place_name": row.get("poi_name", row.get("place_name", place_name)),
                      "latitude": str(row.get("latitude", "")), "longitude": str(row.get("longitude", ""))})

    def query_road_route_info(origin: str, destination: str) -> str:
        """Road route between two points: distance in meters, duration in minutes, cost, all whole numbers. Up to
        2 km it is a walk (cost 0), beyond that a taxi, whose cost is per car of up to 4 people.

        Args:
            origin: Start point, "latitude,longitude" with six decimals as search_location returns them.
            destination: End point, "latitude,longitude" with six decimals as search_location returns them.
        """
        rows = db.frame("routes")
        known = {r["origin"] for r in rows} | {r["destination"] for r in rows}
        if stray := next((point for point in (origin, destination) if point not in known), None):
            return (f"Coordinate {stray} is not in query range, please check:\n1. Whether coordinate comes from "
                    f"valid tool query result, not manual input or fabrication;\n2. Whether coordinate precision is "
                    f"exactly consistent with query result, 6 decimal places")
        row = next((r for r in rows if (r["origin"], r["destination"]) == (origin, destination)), None)
        if row is None:
            return f"No transportation information found from {origin} to {destination}"
        return _json({"origin": row["origin"], "destination": row["destination"],
                      "distance_in_meters": int(row.get("distance_meters", 0)),
                      "duration_in_minutes": int(row.get("duration_minutes", 0)), "cost": int(row.get("cost", 0))})

    def recommend_restaurants(latitude: str, longitude: str) -> str:
        """Restaurants near a point: name, coordinates, price per person, cuisine, opening and closing time,
        nearby attraction, rating, tags.

        Args:
            latitude: Latitude with six decimals, as another tool returned it.
            longitude: Longitude with six decimals, as another tool returned it.
        """
        found = [_restaurant(r, rating="4.5", price="0") for r in db.frame("restaurants")
                 if (r.get("query_latitude"), r.get("query_longitude")) == (latitude, longitude)]
        return _json(found) if found else (f"No recommended restaurants found near coordinates ({latitude}, "
                                           f"{longitude}), please check coordinate source")

    def query_restaurant_details(restaurant_name: str) -> str:
        """One restaurant: ID, name, coordinates, price per person, cuisine, opening and closing time, nearby
        attraction, rating, tags.

        Args:
            restaurant_name: The restaurant's exact name.
        """
        row = next((r for r in db.frame("restaurants") if r.get("restaurant_name") == restaurant_name), None)
        if row is None:
            return _json({"message": f"Detailed information not found for restaurant {restaurant_name}",
                          "restaurant_name": restaurant_name})
        return _json({"id": row.get("restaurant_id", "")} | _restaurant(row, rating="4.0", price="100"))

    return [query_train_info, query_flight_info, query_hotel_info, query_attraction_details, recommend_attractions,
            search_location, query_road_route_info, recommend_restaurants, query_restaurant_details]


# ---------------------------------------------------------------- the reward

SCORES = ("delivered", "commonsense", "personalized", "composite", "case_accuracy")


def plan_scores(meta: dict, db: TravelDatabase, conversation: list[dict]) -> dict[str, float]:
    """The official per-task scores of the last assistant message's delivered plan (extract_plan): delivered (1 when
    it holds a closed <plan> block), commonsense (the share of DIMENSIONS whose checks all pass), personalized (1
    iff there are hard constraints and every one holds), composite (their mean) and case_accuracy (1 iff both are
    1). A task with no delivered plan scores 0 on each, as the official averages count it."""
    text = next((m.get("content") or "" for m in reversed(conversation) if m["role"] == "assistant"), "")
    days, total = parse_plan(text)
    if not extract_plan(text) or not days:
        return dict.fromkeys(SCORES, 0.0) | {"delivered": float(bool(extract_plan(text)))}
    checks = plan_checks(meta, db, days, total)
    commonsense = sum(all(checks[name] for name in names) for names in DIMENSIONS.values()) / len(DIMENSIONS)
    hard = [checks[key] for key in meta.get("hard_constraints", {}) if key in checks]
    personalized = float(bool(hard) and all(hard))
    return dict(delivered=1.0, commonsense=commonsense, personalized=personalized,
                composite=(commonsense + personalized) / 2, case_accuracy=float(commonsense == personalized == 1.0))


def deepplanning_reward(meta: dict, db: TravelDatabase, conversation: list[dict]) -> float:
    """A conversation's reward: the official composite score of its plan (plan_scores)."""
    return plan_scores(meta, db, conversation)["composite"]


# ---------------------------------------------------------------- tasks and splits

def deepplanning_tasks(path: str, split: str, language: str = "en") -> list[Task]:
    """The tasks of a split ("train": 80 % of a seeded shuffle of the task ids, "test": the other 20 %, "all":
    every task, in the benchmark's order), each with the benchmark's opening messages, tools bound to its own
    database, its reward and its official scores."""
    if split not in ("train", "test", "all"):
        raise tip.InputError(f"unknown DeepPlanning split {split!r}: choose train, test or all")
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
    shuffled = order.copy()
    random.Random(SPLIT_SEED).shuffle(shuffled)
    cut = len(shuffled) * 4 // 5
    tasks = []
    for sample in dict(train=shuffled[:cut], test=shuffled[cut:], all=order)[split]:
        db = TravelDatabase(databases / f"id_{sample['id']}")
        tasks.append(Task([{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": sample["query"]}],
                          travel_tools(db), functools.partial(deepplanning_reward, sample["meta_info"], db),
                          functools.partial(plan_scores, sample["meta_info"], db)))
    return tasks
