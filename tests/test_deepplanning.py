"""DeepPlanning environment: tools on a tiny fixture database in the benchmark's layout, splits, reward checks
(worlds/deepplanning_checks.py)."""
import copy
import json
import math
import shutil
from pathlib import Path

import pytest
from transformers.utils import get_json_schema

import rollout
import worlds
import tip
from worlds import deepplanning, deepplanning_checks, deepplanning_tools

FIXTURE = Path(__file__).parent / "fixtures" / "deepplanning"
QUERIES = json.loads((FIXTURE / "data" / "travelplanning_query_en.json").read_text())
META = QUERIES[0]["meta_info"]
DATABASE = FIXTURE / "database" / "database_en"


def tools_of(task_id: int) -> dict:
    db = deepplanning_tools.TravelDatabase(DATABASE / f"id_{task_id}")
    return {tool.__name__: tool for tool in deepplanning_tools.travel_tools(db)}


# ---------------------------------------------------------------- tools

def test_tools_have_the_benchmark_names_and_parameters_and_build_json_schemas():
    expected = {"query_train_info": (["origin", "destination", "depDate"], ["seatClassName"]),
                "query_flight_info": (["origin", "destination", "depDate"], ["seatClassName"]),
                "query_hotel_info": (["destination", "checkinDate", "checkoutDate"], ["hotelStar", "hotelBrands"]),
                "query_attraction_details": (["attraction_name"], []),
                "recommend_attractions": (["city"], ["attraction_type"]),
                "search_location": (["place_name"], []),
                "query_road_route_info": (["origin", "destination"], []),
                "recommend_restaurants": (["latitude", "longitude"], []),
                "query_restaurant_details": (["restaurant_name"], [])}
    tools = tools_of(0)
    assert set(tools) == set(expected)
    for name, tool in tools.items():
        schema = get_json_schema(tool)["function"]
        required, optional = expected[name]
        assert schema["name"] == name and schema["description"]
        assert schema["parameters"]["required"] == required
        assert list(schema["parameters"]["properties"]) == required + optional
        assert all(p["type"] == "string" and p["description"] for p in schema["parameters"]["properties"].values())


# What the official tools (Qwen-Agent benchmark/deepplanning/travelplanning/tools) answer on the fixture, written out
# by hand from their code: JSON indented by 2, field names and number types as they convert them, their sentences.
SEGMENT_KEYS = ["arrCityName", "arrStationCode", "arrStationName", "depCityName", "depStationCode", "depStationName",
                "duration", "arrDateTime", "depDateTime", "marketingTransportName", "marketingTransportNo",
                "seatClassName", "Remaining Seats"]


def test_train_query_answers_routes_of_segments_as_the_official_tool():
    trains = tools_of(0)["query_train_info"]
    text = trains("Hefei", "Nanjing", "2025-11-12")
    assert text.startswith('[\n  [\n    {\n      "Segment 1": {\n        "arrCityName": "Nanjing",')
    routes = json.loads(text)
    assert all(isinstance(r, list) and len(r) == 1 for r in routes)  # each route is a one-item list
    routes = [r[0] for r in routes]
    # route_index is text to the official tool: route 10 comes before route 2; segments in segment_index order
    assert [[r[k]["marketingTransportNo"] for k in r if k != "price"] for r in routes] == \
        [["G7798"], ["K1158"], ["G7798"], ["D5502", "D3076"]]
    assert routes[0] == {"Segment 1": {
        "arrCityName": "Nanjing", "arrStationCode": "NKH", "arrStationName": "Nanjing South Railway Station",
        "depCityName": "Hefei", "depStationCode": "ENH", "depStationName": "Hefei South Railway Station",
        "duration": 60, "arrDateTime": "2025-11-12 09:00", "depDateTime": "2025-11-12 08:00",
        "marketingTransportName": "High-speed Rail", "marketingTransportNo": "G7798",
        "seatClassName": "Second Class Seat", "Remaining Seats": "6"}, "price": 100.0}
    assert list(routes[0]["Segment 1"]) == SEGMENT_KEYS
    assert routes[2]["Segment 1"]["Remaining Seats"] == "Available"  # a blank seat status
    transfer = routes[3]
    assert list(transfer) == ["Segment 1", "Segment 2", "price"]
    assert transfer["price"] == 90.0 and isinstance(transfer["price"], float)  # the first segment's price
    second = transfer["Segment 2"]
    # a later segment's departure city is the previous arrival station less " Station"
    assert (second["depCityName"], second["depStationName"], second["arrCityName"], second["duration"]) == \
        ("Chuzhou Railway", "Chuzhou Railway Station", "Nanjing", 35)
    first = json.loads(trains("Hefei", "Nanjing", "2025-11-12", seatClassName="First Class Seat"))
    assert [[r[0]["Segment 1"]["marketingTransportNo"], r[0]["price"]] for r in first] == [["G7798", 160.0]]
    assert trains("Hefei", "Nanjing", "2025-11-20") == "No train information found from Hefei to Nanjing on 2025-11-20"
    assert trains("Hefei", "Nanjing", "2025-11-12", "Business Seat") == \
        "No train information found from Hefei to Nanjing on 2025-11-12"


def test_flight_query_answers_routes_with_the_aircraft_as_the_official_tool():
    flights = tools_of(1)["query_flight_info"]
    routes = json.loads(flights("Harbin", "Dalian", "2025-11-12"))
    assert all(isinstance(r, dict) for r in routes)  # unlike trains, a route is not wrapped in a list
    assert [r["Segment 1"]["marketingTransportNo"] for r in routes] == ["MU5101", "CZ6301"]
    assert routes[0] == {"Segment 1": {
        "arrCityName": "Dalian", "arrStationCode": "DLC", "arrStationName": "Dalian Zhoushuizi International Airport",
        "depCityName": "Harbin", "depStationCode": "HRB", "depStationName": "Harbin Taiping International Airport",
        "duration": 105, "arrDateTime": "2025-11-12 09:50", "depDateTime": "2025-11-12 08:05",
        "marketingTransportName": "China Eastern", "marketingTransportNo": "MU5101", "seatClassName": "Economy Class",
        "Remaining Seats": "Available", "equipSize": "Medium", "equipType": "Airbus A320", "manufacturer": "Airbus"},
        "price": 620.0}
    assert list(routes[0]["Segment 1"]) == SEGMENT_KEYS + ["equipSize", "equipType", "manufacturer"]
    business = json.loads(flights("Harbin", "Dalian", "2025-11-12", "Business Class"))
    assert [(r["Segment 1"]["marketingTransportNo"], r["Segment 1"]["Remaining Seats"], r["price"])
            for r in business] == [("CZ6301", "2", 1450.0)]
    assert flights("Dalian", "Harbin", "2025-11-12") == \
        "No flight information found from Dalian to Harbin on 2025-11-12"


def test_hotel_query_answers_as_the_official_tool_and_filters_by_exact_star_and_brand():
    hotels = tools_of(0)["query_hotel_info"]
    found = json.loads(hotels("Nanjing", "2025-11-12", "2025-11-13"))
    assert [h["name"] for h in found] == ["Orange Hotel Nanjing Confucius Temple", "Atour Hotel Nanjing Xinjiekou",
                                          "Ji Hotel Nanjing South Station"]
    assert found[0] == {"name": "Orange Hotel Nanjing Confucius Temple",
                        "address": "12 Gongyuan Street, Qinhuai District", "latitude": "32.020100",
                        "longitude": "118.788200", "decorationTime": "2019", "hotelStar": "3", "price": "441",
                        "score": "4.6", "brand": "Orange Hotel", "services": ["Swimming Pool", "Free WiFi"]}
    assert list(found[0]) == ["name", "address", "latitude", "longitude", "decorationTime", "hotelStar", "price",
                              "score", "brand", "services"]
    # neither the destination nor the dates filter, as officially
    assert len(json.loads(hotels("Beijing", "2025-11-13", "2025-11-12"))) == 3
    assert [h["name"] for h in json.loads(hotels("Nanjing", "2025-11-12", "2025-11-13", hotelStar="3"))] == \
        ["Orange Hotel Nanjing Confucius Temple"]
    atour = json.loads(hotels("Nanjing", "2025-11-12", "2025-11-13", hotelBrands="Atour Hotel"))
    assert [h["name"] for h in atour] == ["Atour Hotel Nanjing Xinjiekou"]
    not_found = ("No hotel information found in Nanjing from 2025-11-12 to 2025-11-13, please check parameters or "
                 "reduce constraints")
    assert hotels("Nanjing", "2025-11-12", "2025-11-13", hotelStar="5") == not_found
    assert hotels("Nanjing", "2025-11-12", "2025-11-13", hotelStar="3.0") == not_found  # stars compare as text


def test_attraction_tools_answer_in_the_official_text():
    tools = tools_of(0)
    assert tools["query_attraction_details"]("Nanjing City Wall Taicheng Scenic Area") == (
        "Attraction ID：A101\nAttraction Name：Nanjing City Wall Taicheng Scenic Area\nCity：Nanjing\n"
        "Address：Xuanwu District\nCoordinates：Latitude 32.063000，Longitude 118.795000\n"
        "Description：A Ming-dynasty stretch of the city wall above Xuanwu Lake\n"
        "Rating：4.6(average visitor rating)\nOpening Hours：08:30 to 17:30\nClosed Dates：Monday\n"
        "Minimum Visit Duration：1.5 hours\nMaximum Visit Duration：3.0 hours\nTicket Price：30.0 RMB\n"
        "Attraction Type：Historical and Cultural")
    deji = tools["query_attraction_details"]("Nanjing Deji Plaza").splitlines()
    # equal opening and closing times are written once; an empty cell is pandas' NaN, written "nan"
    assert deji[7:11] == ["Opening Hours：Open 24 Hours", "Closed Dates：nan", "Minimum Visit Duration：2.0 hours",
                          "Maximum Visit Duration：4.0 hours"]
    assert deji[11] == "Ticket Price：0.0 RMB"
    assert tools["query_attraction_details"]("Taicheng") == "Detailed information not found for attraction Taicheng"
    everything = tools["recommend_attractions"]("Nanjing").split("\n")
    assert everything[:2] == ["Recommended attractions:", ""] and len(everything) == 6
    assert tools["recommend_attractions"]("Nanjing", "Natural Scenery") == (
        "Recommended attractions:\n\n"
        "Xuanwu Lake, A large lake park with five islands. This is a Natural Scenery type attraction")
    assert tools["recommend_attractions"]("Nanjing", "Beaches") == "No attraction recommendations found"
    assert tools_of(1)["recommend_attractions"]("Dalian", "Theme Park") == "No attraction recommendations found"


ROUTE_OUT_OF_RANGE = ("Coordinate {} is not in query range, please check:\n1. Whether coordinate comes from valid tool "
                      "query result, not manual input or fabrication;\n2. Whether coordinate precision is exactly "
                      "consistent with query result, 6 decimal places")


def test_location_and_route_tools_answer_as_the_official_tools():
    tools = tools_of(0)
    assert json.loads(tools["search_location"]("Orange Hotel Nanjing Confucius Temple")) == \
        {"place_name": "Orange Hotel Nanjing Confucius Temple", "latitude": "32.020100", "longitude": "118.788200"}
    assert tools["search_location"]("Orange Hotel") == (
        "Coordinate information not found for location Orange Hotel, please check: 1. Whether the place name comes "
        "from other tool results; 2. Whether the place name is exactly consistent with tool results, no "
        "abbreviation, renaming or additional description allowed")
    hotel, wall, lane = "32.020100,118.788200", "32.063000,118.795000", "32.015000,118.781000"
    route = json.loads(tools["query_road_route_info"](hotel, wall))
    assert route == {"origin": hotel, "destination": wall, "distance_in_meters": 1500, "duration_in_minutes": 10,
                     "cost": 0}
    assert list(route) == ["origin", "destination", "distance_in_meters", "duration_in_minutes", "cost"]
    # both points are known, but not this way round
    assert tools["query_road_route_info"](wall, lane) == f"No transportation information found from {wall} to {lane}"
    assert tools["query_road_route_info"]("32.0201,118.7882", wall) == ROUTE_OUT_OF_RANGE.format("32.0201,118.7882")
    assert tools["query_road_route_info"](hotel, "32.0,118.7") == ROUTE_OUT_OF_RANGE.format("32.0,118.7")


def test_restaurant_tools_answer_as_the_official_tools():
    tools = tools_of(0)
    nearby = json.loads(tools["recommend_restaurants"]("32.015000", "118.781000"))
    assert [r["name"] for r in nearby] == \
        ["Six Dynasties Pine Teahouse", "Qinhuai Snack House", "Laomendong Roast Duck"]
    assert nearby[0] == {"name": "Six Dynasties Pine Teahouse", "latitude": "32.016000", "longitude": "118.782000",
                         "price_per_person": "120", "cuisine": "Huaiyang", "opening_time": "11:00",
                         "closing_time": "21:00", "nearby_attraction_name": "Laomendong", "rating": "4.7",
                         "tags": ["Birthday Package", "Private Room"]}
    assert list(nearby[0])[-2:] == ["rating", "tags"] and "tags" not in nearby[1]  # no tags, no key
    assert tools["recommend_restaurants"]("32.015000", "118.784000") == (
        "No recommended restaurants found near coordinates (32.015000, 118.784000), please check coordinate source")
    noodles = json.loads(tools["query_restaurant_details"]("Jinling Noodle House"))
    assert noodles == {"id": "R204", "name": "Jinling Noodle House", "latitude": "32.044500", "longitude": "118.784500",
                       "price_per_person": "40", "cuisine": "Noodles", "opening_time": "10:00", "closing_time": "20:00",
                       "nearby_attraction_name": "Nanjing Deji Plaza", "rating": "4.2"}
    assert list(noodles)[:2] == ["id", "name"]
    assert json.loads(tools["query_restaurant_details"]("Noodles")) == \
        {"message": "Detailed information not found for restaurant Noodles", "restaurant_name": "Noodles"}


def test_missing_cells_show_as_in_the_official_tools(tmp_path):
    """pandas reads an empty cell (or a word such as None or NA) as NaN: the official tools then write "nan" where
    they call str(), "" where they clean it, a JSON NaN where they pass it on, and the attraction's own defaults."""
    folder = tmp_path / "id_0"
    shutil.copytree(DATABASE / "id_0", folder)
    for table, old, new in [("restaurants/restaurants.csv", "R204,Jinling Noodle House,32.044500,118.784500,40,Noodles",
                             "R204,Jinling Noodle House,32.044500,118.784500,None,"),
                            ("hotels/hotels.csv", "2016,2,300,4.3,Ji Hotel,Free WiFi", "NA,2,300,,Ji Hotel,"),
                            ("attractions/attractions.csv", '4.7,06:00,22:00,,2,4,0', 'n/a,06:00,22:00,None,2,,'),
                            ("trains/trains.csv", "First Class Seat,,160", "First Class Seat,nan,")]:
        path = folder / table
        assert old in path.read_text()
        path.write_text(path.read_text().replace(old, new))
    tools = {tool.__name__: tool for tool in deepplanning_tools.travel_tools(deepplanning_tools.TravelDatabase(folder))}
    noodles = tools["query_restaurant_details"]("Jinling Noodle House")
    assert '"price_per_person": "nan"' in noodles and '"cuisine": NaN' in noodles
    ji = json.loads(tools["query_hotel_info"]("Nanjing", "2025-11-12", "2025-11-13", hotelBrands="Ji Hotel"))[0]
    assert (ji["decorationTime"], ji["score"], "services" in ji) == ("", "", False)
    lake = tools["query_attraction_details"]("Xuanwu Lake").splitlines()
    assert [lake[6], lake[8], lake[10], lake[11]] == ["Rating：(average visitor rating)", "Closed Dates：nan",
                                                      "Maximum Visit Duration： hours", "Ticket Price：0 RMB"]
    route = json.loads(tools["query_train_info"]("Hefei", "Nanjing", "2025-11-12", "First Class Seat"))[0][0]
    assert route["Segment 1"]["Remaining Seats"] == "Available" and math.isnan(route["price"])


@pytest.mark.parametrize("name, arguments, answer", [
    ("query_train_info", {"origin": "Hefei", "destination": "Nanjing", "depDate": "12/11/2025"},
     "No train information found from Hefei to Nanjing on 12/11/2025"),
    ("query_hotel_info", {"destination": "Nanjing", "checkinDate": "2025-11-12", "checkoutDate": "2025-11-13",
                          "hotelStar": "12"}, "No hotel information found in Nanjing from 2025-11-12 to 2025-11-13"),
    ("recommend_attractions", {"city": "Nanjing", "attraction_type": "Beaches"}, "No attraction recommendations found"),
    ("query_road_route_info", {"origin": "Orange Hotel Nanjing Confucius Temple", "destination": "32.0,118.7"},
     "Coordinate Orange Hotel Nanjing Confucius Temple is not in query range"),
    ("recommend_restaurants", {"latitude": "north", "longitude": "118.781000"},
     "No recommended restaurants found near coordinates (north, 118.781000)"),
])
def test_a_malformed_argument_matches_nothing_as_officially(name, arguments, answer):
    assert rollout.run_tool_call({"name": name, "arguments": arguments}, tools_of(0)).startswith(answer)


def test_a_missing_argument_raises_and_the_rollout_shows_the_error():
    tools = tools_of(0)
    arguments = {"origin": "Hefei", "destination": "Nanjing", "date": "2025-11-12"}
    with pytest.raises(TypeError):
        tools["query_train_info"](**arguments)
    assert rollout.run_tool_call({"name": "query_train_info", "arguments": arguments}, tools).startswith("Error: ")


def test_the_system_prompt_states_the_plan_format_and_its_example_reads_and_adds_up():
    prompt = deepplanning.SYSTEM_PROMPT
    for line in ("\nDay N:\n", "\nCurrent City: from A to B", "\nAccommodation: Hotel Name, ¥price/room/night",
                 "\nBudget Summary:\n", "\nTotal Estimated Budget: N RMB\n", "<plan> and </plan>"):
        assert line in prompt
    for kind in ("travel_intercity_public", "travel_city", "attraction", "meal", "hotel", "buffer"):
        assert f"\nHH:MM-HH:MM | {kind} | " in prompt
    for tool in ("recommend_attractions", "query_hotel_info", "recommend_restaurants", "query_road_route_info"):
        assert tool in prompt
    days, total = deepplanning_checks.parse_plan("<plan>" + prompt.rsplit("<plan>", 1)[1])
    assert [d["city"] for d in days] == ["from Shanghai to Suzhou", "from Suzhou to Shanghai"]
    assert (days[0]["hotel"], days[1]["hotel"]) == (("Canal View Hotel", 600.0), None)
    assert [len(d["acts"]) for d in days] == [16, 8] and total == 1606
    assert all(b["start"] == a["end"] for d in days for a, b in zip(d["acts"], d["acts"][1:]))
    # 2 people, 1 room: trains 160, taxis 76 (one car), hotel 600, meals 430, tickets 340
    assert deepplanning_checks.plan_cost(days, {"people_number": 2, "room_number": 1}) == 1606


# ---------------------------------------------------------------- tasks and splits

def test_tasks_carry_the_query_the_tools_and_a_reward():
    tasks = [t for split in ("train", "test") for t in deepplanning.deepplanning_tasks(str(FIXTURE), split)]
    assert len(tasks) == 3 and all(isinstance(t, rollout.Task) for t in tasks)
    assert sorted(t.messages[1]["content"] for t in tasks) == sorted(q["query"] for q in QUERIES)
    assert all(t.messages[0]["role"] == "system" and len(t.tools) == 9 for t in tasks)
    nanjing = next(t for t in tasks if "Nanjing" in t.messages[1]["content"])  # the tools read this task's own database
    trains = {tool.__name__: tool for tool in nanjing.tools}["query_train_info"]
    assert "G7798" in trains("Hefei", "Nanjing", "2025-11-12")
    assert nanjing.reward([{"role": "assistant", "content": f"<plan>{GOOD_PLAN}</plan>"}]) == 1.0


def test_splits_are_disjoint_deterministic_and_80_20(tmp_path):
    queries = [dict(QUERIES[0], id=str(i), query=f"task {i}") for i in range(10)]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "travelplanning_query_en.json").write_text(json.dumps(queries))
    for i in range(10):
        shutil.copytree(DATABASE / "id_0", tmp_path / "database" / "database_en" / f"id_{i}")
    ids = {split: [t.messages[1]["content"] for t in deepplanning.deepplanning_tasks(str(tmp_path), split)]
           for split in ("train", "test", "all")}
    assert (len(ids["train"]), len(ids["test"])) == (8, 2)
    assert ids["all"] == [f"task {i}" for i in range(10)]  # every task, in the benchmark's order
    assert set(ids["train"]).isdisjoint(ids["test"])
    assert set(ids["train"]) | set(ids["test"]) == {q["query"] for q in queries}
    assert ids["train"] == [t.messages[1]["content"] for t in deepplanning.deepplanning_tasks(str(tmp_path), "train")]
    assert ids["train"] != sorted(ids["train"], key=lambda q: int(q.split()[1]))[:8]  # shuffled, not the first 8


def test_a_missing_or_malformed_folder_raises_input_error(tmp_path):
    with pytest.raises(tip.InputError, match="does not exist.*data/travelplanning_query_en.json"):
        deepplanning.deepplanning_tasks(str(tmp_path / "nowhere"), "train")
    with pytest.raises(tip.InputError, match="travelplanning_query_en.json is missing.*Qwen/DeepPlanning"):
        deepplanning.deepplanning_tasks(str(tmp_path), "train")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "travelplanning_query_en.json").write_text('[{"id": "0",')
    with pytest.raises(tip.InputError, match="is not valid JSON"):
        deepplanning.deepplanning_tasks(str(tmp_path), "train")
    (tmp_path / "data" / "travelplanning_query_en.json").write_text('{"id": "0"}')
    with pytest.raises(tip.InputError, match="not a list of tasks with id, query and meta_info"):
        deepplanning.deepplanning_tasks(str(tmp_path), "train")
    (tmp_path / "data" / "travelplanning_query_en.json").write_text(json.dumps(QUERIES[:1]))
    shutil.copytree(DATABASE / "id_0", tmp_path / "database" / "database_en" / "id_0")
    (tmp_path / "database" / "database_en" / "id_0" / "hotels" / "hotels.csv").unlink()
    with pytest.raises(tip.InputError, match=r"task 0: .*id_0 lacks hotels/hotels.csv"):
        deepplanning.deepplanning_tasks(str(tmp_path), "train")
    with pytest.raises(tip.InputError, match="unknown DeepPlanning split"):
        deepplanning.deepplanning_tasks(str(FIXTURE), "validation")


# ---------------------------------------------------------------- the reward

GOOD_PLAN = """
Day 1:
Current City: from Hefei to Nanjing
Accommodation: Orange Hotel Nanjing Confucius Temple, ¥441/room/night
08:00-09:00 | travel_intercity_public | train G7798, Hefei South Railway Station - Nanjing South Railway Station, ¥100/person
09:00-09:30 | buffer | Leave the station
09:30-10:00 | travel_city | Nanjing South Railway Station - Orange Hotel Nanjing Confucius Temple, 8km, 30min, ¥30
10:00-10:30 | hotel | Check-in, Orange Hotel Nanjing Confucius Temple
10:30-10:40 | travel_city | Orange Hotel Nanjing Confucius Temple - Nanjing City Wall Taicheng Scenic Area, 1.5km, 10min, ¥0
10:40-12:40 | attraction | Nanjing City Wall Taicheng Scenic Area, ¥30/person
12:40-12:50 | travel_city | Nanjing City Wall Taicheng Scenic Area - Six Dynasties Pine Teahouse, 1km, 10min, ¥0
12:50-14:00 | meal | Lunch, Six Dynasties Pine Teahouse, ¥120/person
14:00-14:20 | travel_city | Six Dynasties Pine Teahouse - Nanjing Deji Plaza, 4km, 20min, ¥20
14:20-17:20 | attraction | Nanjing Deji Plaza, ¥0/person
17:20-17:30 | travel_city | Nanjing Deji Plaza - Jinling Noodle House, 0.5km, 10min, ¥0
17:30-18:30 | meal | Dinner, Jinling Noodle House, ¥40/person
18:30-18:50 | travel_city | Jinling Noodle House - Orange Hotel Nanjing Confucius Temple, 3km, 20min, ¥20
18:50-24:00 | hotel | Rest, Orange Hotel Nanjing Confucius Temple

Day 2:
Current City: from Nanjing to Hefei
Accommodation: -
08:00-08:40 | hotel | Check-out, Orange Hotel Nanjing Confucius Temple
08:40-09:00 | travel_city | Orange Hotel Nanjing Confucius Temple - Laomendong, 2km, 20min, ¥0
09:00-11:20 | attraction | Laomendong, ¥0/person
11:20-11:30 | travel_city | Laomendong - Laomendong Roast Duck, 0.3km, 10min, ¥0
11:30-12:30 | meal | Lunch, Laomendong Roast Duck, ¥60/person
12:30-13:00 | travel_city | Laomendong Roast Duck - Nanjing South Railway Station, 9km, 30min, ¥30
13:00-13:30 | buffer | Security check and boarding
13:30-14:30 | travel_intercity_public | train G3031, Nanjing South Railway Station - Hefei South Railway Station, ¥100/person

Budget Summary:
Transportation: 700 RMB. Trains (100+100)*3=600; taxis 100
Accommodation: 882 RMB. 441*2 rooms*1 night
Meals: 660 RMB. (120+40+60)*3
Attractions & Tickets: 90 RMB. 30*3
Total Estimated Budget: 2332 RMB
"""

# check name (and how) -> (text replacements in the good plan, changes to the task's meta_info): each breaks it
BREAKS = {
    "valid_trip_duration": ([], {"days": 3}),
    "closed_loop_route_structure": ([("from Nanjing to Hefei", "from Nanjing to Shanghai")], {}),
    "seamless_intercity_transfers": ([("Current City: from Hefei to Nanjing", "Current City: Nanjing")], {}),
    "validated_accommodation": ([("¥441/room/night", "¥400/room/night")], {}),
    "validated_attractions": ([("Taicheng Scenic Area, ¥30/person", "Taicheng Scenic Area, ¥35/person")], {}),
    "validated_meals": ([("Dinner, Jinling Noodle House", "Dinner, Jinling Dumpling House")], {}),
    "validated_transportation": ([("Hefei South Railway Station, ¥100/person\n\nBudget",
                                   "Hefei South Railway Station, ¥90/person\n\nBudget")], {}),
    "traceable_accommodation": ([("Accommodation: -",
                                  "Accommodation: Orange Hotel Nanjing Confucius Temple, ¥441/room/night")], {}),
    "ends_with_accommodation": ([("18:50-24:00 | hotel | Rest, Orange Hotel Nanjing Confucius Temple\n", "")], {}),
    "essential_meal_coverage": ([("17:30-18:30 | meal | Dinner, Jinling Noodle House, ¥40/person\n", "")], {}),
    "essential_meal_coverage (meals 90 minutes apart)": ([("17:30-18:30 | meal | Dinner", "15:30-16:30 | meal | Dinner")], {}),
    "essential_attraction_coverage": ([("10:40-12:40 | attraction | Nanjing City Wall Taicheng Scenic Area, ¥30/person\n", ""),
                                       ("14:20-17:20 | attraction | Nanjing Deji Plaza, ¥0/person\n", "")], {}),
    "no_time_overlaps": ([("12:50-14:00 | meal", "12:30-14:00 | meal")], {}),
    "reasonable_transfer_time": ([("10:30-10:40 | travel_city", "10:30-11:10 | travel_city"),
                                  ("10:40-12:40 | attraction", "11:10-12:40 | attraction")], {}),
    "attraction_visit_within_opening_hours": ([("08:00-08:40 | hotel", "08:00-08:20 | hotel"),
                                               ("08:40-09:00 | travel_city", "08:20-08:40 | travel_city"),
                                               ("09:00-11:20 | attraction", "08:40-11:20 | attraction")], {}),
    "dining_within_service_hours": ([("11:30-12:30 | meal", "11:30-12:40 | meal"),
                                     ("12:30-13:00 | travel_city", "12:40-13:00 | travel_city")], {}),
    "avoidance_of_closure_days": ([], {"depart_weekday": 1}),  # day 1 a Monday: the city wall is closed
    "reasonable_duration_at_attractions": ([("14:20-17:20 | attraction", "14:20-15:50 | attraction")], {}),
    "reasonable_duration_at_attractions (too long)": ([("14:20-17:20 | attraction", "13:00-17:20 | attraction")], {}),
    "reasonable_meal_duration": ([("17:30-18:30 | meal", "17:30-17:50 | meal")], {}),
    "cost_calculation_correctness": ([("Total Estimated Budget: 2332 RMB", "Total Estimated Budget: 5000 RMB")], {}),
    "diverse_meal_options": ([("Lunch, Laomendong Roast Duck, ¥60/person",
                               "Lunch, Jinling Noodle House, ¥40/person")], {}),
    "diverse_attraction_options": ([("09:00-11:20 | attraction | Laomendong", "09:00-11:20 | attraction | Nanjing Deji Plaza")], {}),
    # hard constraints
    "train_seat_status": ([("train G3031", "train G3033")], {}),
    "hotel_star_service_required": ([("Orange Hotel Nanjing Confucius Temple", "Atour Hotel Nanjing Xinjiekou")], {}),
    "restaurant_specific_tag_nearby": ([("Six Dynasties Pine Teahouse", "Qinhuai Snack House")], {}),
    "attraction_must_visit_named": ([("Nanjing Deji Plaza", "Xuanwu Lake")], {}),
    "budget_constraint": ([], {"hard_constraints": {**META["hard_constraints"],
                                                     "budget_constraint": {"max_budget": 2000}}}),
    "flight_cheapest_direct": ([], {"hard_constraints": {**META["hard_constraints"],
                                                          "flight_cheapest_direct": {"outbound_flight_no": "MU5101"}}}),
}


def score(plan: str, meta: dict | None = None) -> tuple[float, dict]:
    db = deepplanning_tools.TravelDatabase(DATABASE / "id_0")
    conversation = [{"role": "user", "content": QUERIES[0]["query"]},
                    {"role": "assistant", "content": '<tool_call>{"name": "search_location"}</tool_call>'},
                    {"role": "tool", "content": "Error"},
                    {"role": "assistant", "content": f"<think>a plan</think>Here it is.\n<plan>{plan}</plan>"}]
    meta = meta or META
    checks = deepplanning_checks.plan_checks(meta, db, *deepplanning_checks.parse_plan(f"<plan>{plan}</plan>"))
    return deepplanning.deepplanning_reward(meta, db, conversation), checks


def test_a_plan_that_satisfies_every_check_scores_1():
    reward, checks = score(GOOD_PLAN)
    commonsense = {name for names in deepplanning_checks.DIMENSIONS.values() for name in names}
    assert set(checks) == commonsense | set(META["hard_constraints"])
    assert [name for name, ok in checks.items() if not ok] == [] and reward == 1.0
    days, total = deepplanning_checks.parse_plan(f"<plan>{GOOD_PLAN}</plan>")
    assert (len(days), total, deepplanning_checks.plan_cost(days, META)) == (2, 2332.0, 2332.0)
    markdown = GOOD_PLAN.replace("Day 1:", "**Day 1:**").replace("Total Estimated Budget: 2332 RMB",
                                                                  "**Total Estimated Budget: ¥2,332**")
    assert score(markdown)[0] == 1.0


@pytest.mark.parametrize("check", BREAKS)
def test_a_plan_that_breaks_a_check_scores_lower(check):
    plan, (replacements, meta_changes) = GOOD_PLAN, BREAKS[check]
    for old, new in replacements:
        assert old in plan
        plan = plan.replace(old, new)
    reward, checks = score(plan, {**copy.deepcopy(META), **meta_changes})
    assert checks[check.split(" (")[0]] is False and reward < 1.0


def test_no_plan_scores_0():
    assert score("I could not find any trains.")[0] == 0.0


def test_train_reads_deepplanning_tasks_as_conversations(tmp_path):
    """--prompts deepplanning:PATH gives train.py one conversation with tools per train-split task, its reward
    the rule-based score; too short a --max-prompt-len is refused with the length it needs."""
    from conftest import char_tokenizer
    tokenizer = char_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                               "{% endfor %}{% if tools %}{{ tools | length }} tools{% endif %}"
                               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    config = tip.Config(prompts=f"deepplanning:{FIXTURE}", max_prompt_len=100000, chat_template_kwargs="{}")
    prompts = worlds.load_prompts(config, tokenizer)
    tasks = deepplanning.deepplanning_tasks(str(FIXTURE), "train")
    assert len(prompts) == len(tasks) > 0 and all(p["answer"] is None for p in prompts)
    assert all(p["prompt"].endswith("9 tools<|im_start|>assistant\n") and p["task"].reward for p in prompts)
    with pytest.raises(tip.InputError, match="raise --max-prompt-len"):
        worlds.load_prompts(tip.Config(prompts=f"deepplanning:{FIXTURE}", max_prompt_len=5,
                                         chat_template_kwargs="{}"), tokenizer)


@pytest.mark.parametrize("split", ["test", "all"])
def test_evaluate_reports_the_benchmarks_averages_over_the_split_and_each_task(split, tmp_path, monkeypatch):
    """evaluate.py --data deepplanning:PATH --split test|all samples each task of the split as a conversation with
    tools, scores its last assistant turn with the task's official scores, and reports their averages over every
    task and sample (the published numbers), each task's scores in the JSON, and the composite as the accuracy."""
    import evaluate
    from conftest import char_tokenizer, tiny_causal_lm
    tokenizer = char_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'][:40] }}<|im_end|>"
                               "\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tiny_causal_lm(tokenizer, 16, layers=1).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    seen = []

    def stand_in(meta, db, conversation):  # different scores at every call, so a misplaced one shows
        seen.append(conversation)
        k = len(seen)
        return dict(delivered=float(k % 2), commonsense=k / 10, personalized=float(k % 3 == 0),
                    composite=(k / 10 + float(k % 3 == 0)) / 2, case_accuracy=float(k == 3))
    monkeypatch.setattr(deepplanning, "plan_scores", stand_in)
    turns, sample = [], rollout.generate_conversations
    monkeypatch.setattr(rollout, "generate_conversations", lambda *a, **k: turns.append(a[5]) or sample(*a, **k))
    evaluate.main(["--model", str(tmp_path / "model"), "--data", f"deepplanning:{FIXTURE}", "--samples", "2",
                   "--split", split, "--max-new-tokens", "6", "--device", "cpu", "--out", str(tmp_path / "eval.json")])
    assert set(turns) == {150}  # the official agent's limit of model calls, unless --max-turns says otherwise
    report = json.loads((tmp_path / "eval.json").read_text())
    summary, problems = report["summary"], report["problems"]
    tasks = len(deepplanning.deepplanning_tasks(str(FIXTURE), split))
    assert tasks == (len(QUERIES) if split == "all" else len(deepplanning.deepplanning_tasks(str(FIXTURE), "test")))
    assert summary["benchmark"] == "deepplanning" and summary["split"] == split and summary["problems"] == tasks
    assert len(seen) == 2 * tasks and all(len(p["scores"]) == 2 for p in problems)
    seen.clear()  # the stand-in's numbers again, in the order it gave them
    expected = [stand_in(None, None, None) for _ in range(2 * tasks)]
    assert [score for p in problems for score in p["scores"]] == expected
    for name, field in (("delivery_rate", "delivered"), ("commonsense", "commonsense"),
                        ("personalized", "personalized"), ("composite", "composite"),
                        ("case_accuracy", "case_accuracy")):
        assert summary[name] == pytest.approx(sum(e[field] for e in expected) / (2 * tasks)), name
    assert summary["accuracy"] == pytest.approx(summary["composite"]) and summary["max_turns"] == 150
    assert [p["correct"] for p in problems] == [[e["composite"] for e in expected[2 * i:2 * i + 2]]
                                                for i in range(tasks)]


def test_the_plan_is_delivered_and_extracted_as_the_official_agent_does():
    """Only closed <plan> blocks (tags in any case) after the last </think> are delivered, joined by a blank line;
    no tags or an unclosed <plan> deliver nothing and score 0 on every official score."""
    extract = deepplanning_checks.extract_plan
    assert extract("Day 1:\nCurrent City: A") == "" and extract("<plan>Day 1:\nCurrent City: A") == ""
    assert extract("<PLAN> x </Plan>") == "x" and extract("<plan>a</plan> then <plan>\n\n</plan><plan>b</plan>") \
        == "a\n\nb"
    assert extract("<plan>draft</plan></THINK>text<plan>final</plan>") == "final"
    # several reasoning blocks: only what follows the last one is delivered
    assert extract("<think>a</think><plan>early</plan><think>b <plan>in thought</plan></think>\n<plan>last</plan>") \
        == "last"
    assert extract("<think>a</think><plan>early</plan><think>then I drop it</think>") == ""
    assert extract("<think><plan>inside</plan></think>") == ""
    db = deepplanning_tools.TravelDatabase(DATABASE / "id_0")

    def scores(content: str) -> dict:
        return deepplanning.plan_scores(META, db, [{"role": "assistant", "content": content}])
    for undelivered in (GOOD_PLAN, f"<plan>{GOOD_PLAN}", f"<plan>{GOOD_PLAN}</plan></think>"):
        assert scores(undelivered) == dict.fromkeys(deepplanning.SCORES, 0.0)
    assert scores(f"<Plan>{GOOD_PLAN}</PLAN>") == dict(delivered=1.0, commonsense=1.0, personalized=1.0,
                                                      composite=1.0, case_accuracy=1.0)
    # a draft and a final block are both delivered: twice the days, so the trip no longer adds up
    twice = scores(f"<plan>{GOOD_PLAN}</plan>\n<plan>{GOOD_PLAN}</plan>")
    assert twice["delivered"] == 1.0 and twice["commonsense"] < 1.0 and twice["case_accuracy"] == 0.0
    days, _ = deepplanning_checks.parse_plan(f"<plan>{GOOD_PLAN}</plan>\n<plan>{GOOD_PLAN}</plan>")
    assert len(days) == 2 * len(deepplanning_checks.parse_plan(f"<plan>{GOOD_PLAN}</plan>")[0])
    # one failed hard constraint: personalized 0, composite the mean, no case accuracy
    over_budget = {**META, "hard_constraints": {**META["hard_constraints"],
                                                "budget_constraint": {"max_budget": 2000}}}
    failed = deepplanning.plan_scores(over_budget, db, [{"role": "assistant", "content": f"<plan>{GOOD_PLAN}</plan>"}])
    assert failed == dict(delivered=1.0, commonsense=1.0, personalized=0.0, composite=0.5, case_accuracy=0.0)
    no_hard = deepplanning.plan_scores({**META, "hard_constraints": {}}, db,
                                       [{"role": "assistant", "content": f"<plan>{GOOD_PLAN}</plan>"}])
    assert no_hard["personalized"] == 0.0 and no_hard["commonsense"] == 1.0  # the official veto needs one to pass


def test_split_is_refused_without_deepplanning(capsys):
    import evaluate
    with pytest.raises(SystemExit):
        evaluate.main(["--model", "m", "--benchmark", "math500", "--split", "all"])
    assert "--split chooses DeepPlanning's tasks: use it with --data deepplanning:PATH" in capsys.readouterr().err


def test_parsing_does_not_depend_on_case_or_on_how_a_price_is_written():
    """Keywords, activity types, modes and city names in any case, and prices written ¥30, 30 RMB, 30 yuan,
    CNY 30 or RMB30, all read as the clean plan: every check still passes."""
    variants = {
        "capitalised route": [("from Hefei to Nanjing", "From Hefei to Nanjing"),
                              ("from Nanjing to Hefei", "FROM Nanjing TO Hefei")],
        "cities in lower case": [("from Hefei to Nanjing", "from hefei to nanjing"),
                                 ("from Nanjing to Hefei", "from nanjing to hefei")],
        "types and modes in any case": [("| attraction |", "| Attraction |"), ("| meal |", "| MEAL |"),
                                        ("train G7798", "Train G7798"), ("| hotel |", "| Hotel |")],
        "CNY before the number": [("¥30/person", "CNY 30/person"), ("¥120/person", "CNY 120 per person")],
        "RMB and yuan": [("¥30/person", "30 RMB/person"), ("¥120/person", "RMB120/person"),
                         ("¥40/person", "40 yuan/person")],
    }
    for name, replacements in variants.items():
        plan = GOOD_PLAN
        for old, new in replacements:
            assert old in plan, (name, old)
            plan = plan.replace(old, new)
        reward, checks = score(plan)
        assert [check for check, ok in checks.items() if not ok] == [] and reward == 1.0, name
    days, _ = deepplanning_checks.parse_plan(f"<plan>{GOOD_PLAN.replace('¥30/person', 'CNY 30/person')}</plan>")
    assert [(a["name"], a["price"]) for a in days[0]["acts"] if a["type"] == "attraction"] == [
        ("Nanjing City Wall Taicheng Scenic Area", 30.0), ("Nanjing Deji Plaza", 0.0)]


def test_an_arrival_after_midnight_is_read_on_the_clock_as_officially():
    """The official meal and sight rules read a train's arrival on the clock: one that leaves at 23:00 and
    arrives at 00:30 arrives at 0.5 h (early: two meals and a sight that day), not at 24.5 h."""
    late = GOOD_PLAN.replace("08:00-09:00 | travel_intercity_public", "23:00-00:30 | travel_intercity_public")
    days, _ = deepplanning_checks.parse_plan(f"<plan>{late}</plan>")
    train = next(a for a in days[0]["acts"] if a["type"] == "travel_intercity_public")
    assert (train["start"], train["end"]) == (23 * 60, 24 * 60 + 30)  # ordered after its start, for overlaps
    _, checks = score(late)
    assert checks["essential_meal_coverage"] and checks["essential_attraction_coverage"]
    one_meal = late.replace("12:50-14:00 | meal | Lunch, Six Dynasties Pine Teahouse, ¥120/person\n", "")
    assert not score(one_meal)[1]["essential_meal_coverage"]  # arriving at 00:30 needs both meals


@pytest.mark.parametrize("depart_weekday", range(1, 8))
def test_closure_days_follow_the_calendar_through_the_week(depart_weekday):
    """A day-1 sight closed on the departure's weekday, or a day-2 sight closed on the next weekday (Sunday then
    Monday included), fails avoidance_of_closure_days; closed on any other weekday, it passes."""
    names = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
    db = deepplanning_tools.TravelDatabase(DATABASE / "id_0")

    class ClosedOn:  # the fixture's tables, with chosen closing days
        def __init__(self, closures: dict):
            self.closures = closures

        def rows(self, table):
            rows = db.rows(table)
            if table != "attractions":
                return rows
            return [{**row, "closing_dates": self.closures.get(row["attraction_name"], "")} for row in rows]
    days, total = deepplanning_checks.parse_plan(f"<plan>{GOOD_PLAN}</plan>")
    meta = {**META, "depart_weekday": depart_weekday}
    for day, sight in ((0, "Nanjing City Wall Taicheng Scenic Area"), (1, "Laomendong")):
        for closed in range(1, 8):
            checks = deepplanning_checks.plan_checks(meta, ClosedOn({sight: names[closed - 1]}), days, total)
            visited_on = (depart_weekday - 1 + day) % 7 + 1
            assert checks["avoidance_of_closure_days"] == (closed != visited_on), (sight, closed)
